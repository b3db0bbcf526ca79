"""Keep credentials out of what a run records. Params, tags, the logged config and text artifacts
pass through here: config values whose key looks like a secret are masked, and so is any value of
a secret-looking environment variable (MLFLOW_TRACKING_PASSWORD, *_TOKEN, PGPASSWORD, ...) and, in
every URL wherever it appears, the userinfo (http://user:password@host, https://:token@host) and
the values of secret-looking query keys (?token=, X-Amz-Signature=, sig=)."""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

MASK = "***"
# Words that make a config key (its last dotted part), an environment variable name or a URL query key
# a credential: MLFLOW_TRACKING_PASSWORD, HF_TOKEN, AWS_SECRET_ACCESS_KEY, api_key, X-Amz-Signature, sig;
# not signal_tokens or tokenizer, nor attention's key_value / key_dim (model.num_key_value_heads).
SECRET_WORDS = {"token", "secret", "secrets", "credential", "credentials", "key", "apikey", "accesskey",
                "privatekey", "signature", "sig"}
HARMLESS_KEY = re.compile(r"key_(?=value|dim)")  # attention's key, not a credential
SECRET_ENDINGS = ("password", "passwd", "passphrase")  # also inside a word: PGPASSWORD
SECRET_LAST_WORDS = {"auth", "pwd", "pass"}  # REDISCLI_AUTH, MYSQL_PWD, SMTP_PASS; not SSH_AUTH_SOCK
WORKING_DIRECTORIES = {"PWD", "OLDPWD"}  # the shell's, not passwords
MIN_SECRET_CHARS = 6  # shorter environment values ("1", "true") would mask ordinary text
URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'<>]*[^\s\"'<>.,;:!?)\]}]")  # not the full stop after it
OVERRIDE = re.compile(r"(?P<key>[+~]*[\w.\-/]+)=(?P<value>\S+)")


def is_secret_name(name: str) -> bool:
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name.rsplit(".", 1)[-1].lstrip("+~"))  # accessToken
    words = re.split(r"[_\-\s]+", HARMLESS_KEY.sub("kv", name.lower().replace("-", "_")))
    return words[-1] in SECRET_LAST_WORDS or any(w in SECRET_WORDS or w.endswith(SECRET_ENDINGS) for w in words)


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of the environment variables whose names look like credentials, longest first."""
    environ = os.environ if environ is None else environ
    values = {value for name, value in environ.items()
              if is_secret_name(name) and name not in WORKING_DIRECTORIES and len(value) >= MIN_SECRET_CHARS}
    return sorted(values, key=len, reverse=True)


def _query(query: str) -> str:
    pairs = parse_qsl(query, keep_blank_values=True)
    masked = [(key, MASK if value and is_secret_name(key) else value) for key, value in pairs]
    return query if masked == pairs else urlencode(masked, safe=MASK[0], quote_via=quote)


def url(value: str) -> str:
    """One URL with its credentials masked: the password of its userinfo (all of it when there is
    no password: a lone user is often a token) and the values of secret-looking query keys."""
    try:
        parts = urlsplit(value)
    except ValueError:  # e.g. a broken [IPv6] host: it cannot be shown safely
        return MASK
    userinfo, at, host = parts.netloc.rpartition("@")  # the last @: a password may contain one
    if at:
        user, colon, _ = userinfo.partition(":")
        host = f"{user}:{MASK}@{host}" if colon else f"{MASK}@{host}"
    masked = parts._replace(netloc=host, query=_query(parts.query), fragment=_query(parts.fragment))
    return value if masked == parts else urlunsplit(masked)


def text(value: str, secrets: list[str] | None = None) -> str:
    """`value` with every secret environment value and URL credential replaced by ***."""
    for secret in secret_values() if secrets is None else secrets:
        value = value.replace(secret, MASK)
    return URL.sub(lambda match: url(match[0]), value)


def overrides(value: str, secrets: list[str] | None = None) -> str:
    """A command line such as `a.b=1 api_token=abc`: values of secret-looking keys masked too."""
    masked = OVERRIDE.sub(lambda m: f"{m['key']}={MASK}" if is_secret_name(m["key"]) else m[0], value)
    return text(masked, secrets)


def flat(params: dict[str, str]) -> dict[str, str]:
    """Dotted config keys -> values, masked (MLflow params)."""
    secrets = secret_values()
    return {key: MASK if is_secret_name(key) and value != "null" else text(value, secrets)
            for key, value in params.items()}


def tags(values: dict[str, Any]) -> dict[str, str]:
    secrets = secret_values()
    return {key: overrides(str(value), secrets) for key, value in values.items()}


def container(config: Any, key: str = "") -> Any:
    """A resolved config (nested dicts and lists), masked the same way, for config.yaml."""
    if isinstance(config, dict):
        return {k: container(v, str(k)) for k, v in config.items()}
    if isinstance(config, list):
        return [container(v, key) for v in config]
    if config is not None and key and is_secret_name(key):
        return MASK
    return text(config) if isinstance(config, str) else config

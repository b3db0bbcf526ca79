"""Keep credentials out of what a run records. Params, tags, the logged config and text artifacts
pass through here: config values whose key looks like a secret are masked, and so is any value of
a secret-looking environment variable (MLFLOW_TRACKING_PASSWORD, *_TOKEN, ...) and the password of
a URL such as http://user:password@host wherever they appear."""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
# Words that make a config key (its last dotted part) or an environment variable name a credential:
# MLFLOW_TRACKING_PASSWORD, HF_TOKEN, AWS_SECRET_ACCESS_KEY, api_key; not signal_tokens, tokenizer or PWD.
SECRET_WORDS = {"password", "passwd", "passphrase", "token", "secret", "secrets", "credential",
                "credentials", "key", "apikey", "accesskey", "privatekey"}
MIN_SECRET_CHARS = 6  # shorter environment values ("1", "true") would mask ordinary text
URL_PASSWORD = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:)([^/\s@]+)@")
OVERRIDE = re.compile(r"(?P<key>[+~]*[\w.\-/]+)=(?P<value>\S+)")


def is_secret_name(name: str) -> bool:
    words = re.split(r"[_\-\s]+", name.rsplit(".", 1)[-1].lstrip("+~").lower())
    return any(word in SECRET_WORDS for word in words)


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of the environment variables whose names look like credentials, longest first."""
    environ = os.environ if environ is None else environ
    values = {value for name, value in environ.items() if is_secret_name(name) and len(value) >= MIN_SECRET_CHARS}
    return sorted(values, key=len, reverse=True)


def text(value: str, secrets: list[str] | None = None) -> str:
    """`value` with every secret environment value and URL password replaced by ***."""
    for secret in secret_values() if secrets is None else secrets:
        value = value.replace(secret, MASK)
    return URL_PASSWORD.sub(rf"\1{MASK}@", value)


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

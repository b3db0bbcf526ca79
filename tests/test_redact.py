"""Credentials in URLs and environment variables stay out of params, tags, config.yaml and text
artifacts (fp8exp.tracking.redact)."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest

from fp8exp.tracking import redact

TOKEN = "dapi0123456789abcdef"
SIGNED = ("https://bucket.s3.amazonaws.com/aclImdb_v1.tar.gz?X-Amz-Algorithm=AWS4-HMAC-SHA256"
          "&X-Amz-Credential=AKIAEXAMPLE%2F20250101&X-Amz-Signature=9f8e7d6c5b4a")


@pytest.mark.parametrize("raw,masked", [
    (SIGNED, ("https://bucket.s3.amazonaws.com/aclImdb_v1.tar.gz?X-Amz-Algorithm=AWS4-HMAC-SHA256"
              "&X-Amz-Credential=***&X-Amz-Signature=***")),
    ("https://mirror.example/x.tgz?token=hf_AbCdEf123456&v=2", "https://mirror.example/x.tgz?token=***&v=2"),
    ("https://acct.blob.core.windows.net/c/x.tgz?sv=2022&sig=abc%2Bdef", "https://acct.blob.core.windows.net/c/x.tgz?sv=2022&sig=***"),
    ("https://h/x?accessToken=abc&apiKey=def&password=ghi&auth=jkl&page=3",
     "https://h/x?accessToken=***&apiKey=***&password=***&auth=***&page=3"),
    ("https://h/cb#access_token=abc&state=1", "https://h/cb#access_token=***&state=1"),
    (f"https://:{TOKEN}@mlflow.example.com", "https://:***@mlflow.example.com"),
    ("https://user:p@ssw0rd@store.example.com/artifacts", "https://user:***@store.example.com/artifacts"),
    ("https://ghp_abcdefghijkl@github.com/org/repo", "https://***@github.com/org/repo"),
    ("http://bob:pa55@host:5000", "http://bob:***@host:5000"),
])
def test_url_credentials_are_masked(raw, masked):
    assert redact.text(raw, secrets=[]) == masked


@pytest.mark.parametrize("harmless", [
    "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
    "https://h/x?page=2&q=a%20b&key=", "sqlite:///tmp/mlflow.db", "file:///tmp/art", "https://h/docs#token",
])
def test_urls_without_credentials_are_unchanged(harmless):
    assert redact.text(harmless, secrets=[]) == harmless


def test_urls_inside_text_are_masked_where_they_stand():
    line = f'uri: "https://:{TOKEN}@h/x" and {SIGNED}, done'
    assert redact.text(line, secrets=[]) == \
        'uri: "https://:***@h/x" and ' + redact.url(SIGNED) + ", done"


def test_every_masking_entry_point_masks_url_credentials():
    value = f"https://:{TOKEN}@h/x?sig=s1gnature"
    overrides = f"data=imdb data.url={value} tracking.uri=https://u:p@ss@h"
    recorded = [*redact.flat({"data.url": value}).values(), *redact.tags({"overrides": overrides}).values(),
                redact.overrides(overrides), redact.container({"data": {"url": value, "mirrors": [value]}})]
    assert TOKEN not in repr(recorded) and "s1gnature" not in repr(recorded) and "p@ss" not in repr(recorded)
    assert redact.flat({"data.url": value}) == {"data.url": "https://:***@h/x?sig=***"}


def test_database_password_variables_are_secrets_but_working_directories_are_not():
    env = {"PGPASSWORD": "hunter2hunter2", "MYSQL_PWD": "hunter3hunter3", "SMTP_PASS": "hunter4hunter4",
           "PWD": "/work/main", "OLDPWD": "/work/shared", "SSH_AUTH_SOCK": "/tmp/ssh-agent.sock"}
    assert sorted(redact.secret_values(env)) == ["hunter2hunter2", "hunter3hunter3", "hunter4hunter4"]
    with mock.patch.dict(os.environ, env):
        assert redact.text("pw hunter2hunter2 / hunter3hunter3 in /work/main") == "pw *** / *** in /work/main"


def test_a_runs_params_tags_and_config_mask_url_credentials(tmp_path):
    from mlflow.tracking import MlflowClient

    from fp8exp.tracking.context import open_run
    from tests.conftest import compose_config

    url = f"https://:{TOKEN}@mirror.example/aclImdb_v1.tar.gz?token=hf_AbCdEf123456"
    cfg = compose_config("data=imdb", f"data.url='{url}'", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                         f"tracking.artifact_root={tmp_path / 'artifacts'}")
    with open_run(cfg, "leak-test", {"overrides": f"data=imdb data.url={SIGNED}"}) as run:
        run_id = run.run_id
    client = MlflowClient(cfg.tracking.uri)
    recorded = client.get_run(run_id).data
    config_yaml = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()
    assert recorded.params["data.url"] == "https://:***@mirror.example/aclImdb_v1.tar.gz?token=***"
    assert recorded.tags["overrides"] == f"data=imdb data.url={redact.url(SIGNED)}"
    everything = repr([recorded.params, recorded.tags]) + config_yaml
    for secret in (TOKEN, "hf_AbCdEf123456", "9f8e7d6c5b4a", "AKIAEXAMPLE"):
        assert secret not in everything


def test_key_marks_a_secret_except_attention_s_key_value_and_key_dim():
    from fp8exp.tracking.redact import is_secret_name

    for secret in ("api_key", "AWS_SECRET_ACCESS_KEY", "key", "tracking.private_key", "encryptionKey",
                   "aws_access_key_id", "AWS_ACCESS_KEY_ID", "private_key_path", "api_key_1", "key_file", "key_id",
                   "client_key_data", "apiKeyId", "X-Api-Key", "ssh_key"):
        assert is_secret_name(secret), secret
    for harmless in ("model.num_key_value_heads", "key_value_heads", "model.key_dim", "monkey",
                     "hydra.job.override_dirname"):
        assert not is_secret_name(harmless), harmless

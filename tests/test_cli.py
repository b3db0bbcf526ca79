"""`python -m fp8exp` as a user runs it: fresh interpreter, default SQLite store in the launch dir."""

import re

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import FAST, run_cli


@pytest.mark.slow
def test_cli_run_prints_summary_and_lands_in_the_default_store(tmp_path):
    result = run_cli("precision=float8", "model.hidden_dim=64", *FAST, "trainer.epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"fp8exp float8-h64: test accuracy \d\.\d{4}", result.stdout)
    assert "mlflow ui --backend-store-uri sqlite:///" in result.stdout
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", result.stdout).group(1)
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith(f"file://{tmp_path / 'mlartifacts'}")
    assert run.data.tags["overrides"].startswith("precision=float8 model.hidden_dim=64")
    assert run.data.tags["hydra.output_dir"].startswith(str(tmp_path / "outputs"))


@pytest.mark.parametrize("override,message", [
    ("model.hidden_dim=30", "model.hidden_dim: 30 is not divisible by model.num_heads=4; "
                            "pick a multiple of 4 or change model.num_heads"),
    ("trainer.epochs=-1", "trainer.epochs: got -1, expected a positive number"),
    ("model.dropout=1.5", "model.dropout: got 1.5, expected a value in [0, 1)"),
])
def test_bad_input_is_one_line_exit_2_and_no_store(tmp_path, override, message):
    result = run_cli("model.num_heads=4", override, cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"fp8exp: error: {message}"
    assert not (tmp_path / "mlflow.db").exists()
    assert "keras" not in result.stderr.lower()


def test_unknown_precision_lists_the_options(tmp_path):
    result = run_cli("precision=fp16", cwd=tmp_path, timeout=60)
    assert result.returncode != 0
    for option in ("float32", "mixed_bfloat16", "mixed_float16", "float8"):
        assert option in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_help_lists_the_config_groups(tmp_path):
    result = run_cli("--help", cwd=tmp_path, timeout=60)
    assert result.returncode == 0
    assert "precision: float32, float8, float8_block, float8_current, float8_mxfp8, float8_rowwise, float8_rowwise_gw_hp, mixed_bfloat16, mixed_float16" in result.stdout
    assert ("model: base, bert_base, bert_small, bert_tiny, gemma_base, gemma_small, gemma_tiny, gpt2_base, "
            "gpt2_small, gpt2_tiny, large, llama_base, llama_small, llama_tiny, small, tiny") in result.stdout


def test_unreachable_tracking_server_fails_fast_and_clearly(tmp_path):
    result = run_cli("tracking.uri=http://127.0.0.1:9", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "fp8exp: error: tracking.uri: cannot reach the MLflow server at http://127.0.0.1:9")

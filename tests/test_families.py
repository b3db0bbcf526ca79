"""keras-hub model families (fp8exp/models/families.py): every `model=<family>_<size>` composes and
validates; the tiny models build, quantize to FP8 layer by layer and learn in float32 and float8;
a preset saved to disk loads and trains on; every bad setting is one line naming the key."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from fp8exp.config import ConfigError, validate
from fp8exp.config.checks import check_task
from fp8exp.config.schema import model_name
from fp8exp.models import families
from fp8exp.models.classifier import loss_for
from fp8exp.precision import policy
from fp8exp.precision.scales import SCALED_TENSORS, scale_variables
from tests.conftest import CONF, compose_config

FAMILIES = ("gpt2", "llama", "gemma", "bert")
SIZES = ("tiny", "small", "base")
VOCAB, LENGTH, BATCH = 128, 32, 8
STEPS = 12

# What FP8 quantizes, per transformer block (`<block>/<path>`), and outside the blocks: every Dense
# and EinsumDense. Embeddings (the tied LM head included), norms and rotary layers stay high precision.
BLOCK = {"gpt2": "transformer_layer_{}", "llama": "transformer_layer_{}", "gemma": "decoder_block_{}",
         "bert": "transformer_layer_{}"}
PER_BLOCK = {
    "gpt2": ["self_attention/query", "self_attention/key", "self_attention/value", "self_attention/attention_output",
             "feedforward_intermediate_dense", "feedforward_output_dense"],
    "llama": ["self_attention/query", "self_attention/key", "self_attention/value", "self_attention/attention_output",
              "feedforward_gate_dense", "feedforward_intermediate_dense", "feedforward_output_dense"],
    "gemma": ["attention/query", "attention/key", "attention/value", "attention/attention_output",
              "ffw_gating", "ffw_gating_2", "ffw_linear"],
    "bert": ["self_attention_layer/query", "self_attention_layer/key", "self_attention_layer/value",
             "self_attention_layer/attention_output", "feedforward_intermediate_dense", "feedforward_output_dense"],
}
OUTSIDE_BLOCKS = {"gpt2": [], "llama": [], "gemma": [], "bert": ["pooled_dense", "head"]}


def expected_fp8_layers(family: str, num_layers: int = 2) -> set[str]:
    return {f"{BLOCK[family].format(i)}/{path}" for i in range(num_layers) for path in PER_BLOCK[family]} | \
        set(OUTSIDE_BLOCKS[family])


def tiny(family: str, precision: str = "float32", *overrides: str):
    cfg = compose_config(f"model={family}_tiny", f"precision={precision}", "data=synthetic",
                         f"data.sequence_length={LENGTH}", f"data.vocabulary_size={VOCAB}", *overrides)
    validate(cfg)
    return cfg


def token_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """LENGTH + 1 random ids per row, the last rows right-padded (id 0, mask False)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, VOCAB, (BATCH, LENGTH + 1)).astype("int32")
    mask = np.ones_like(ids, dtype=bool)
    for row, keep in ((BATCH - 1, LENGTH // 2), (BATCH - 2, LENGTH - 3)):
        ids[row, keep:], mask[row, keep:] = 0, False
    return ids, mask


def build(cfg, make):
    """policy.build: build under the precision's policy, then FP8-quantize (float8)."""
    keras.utils.set_random_seed(0)
    return policy.build(cfg.precision, make)


def train(model, loss, x, y, sample_weight=None, steps=STEPS, learning_rate=3e-3) -> list[float]:
    """Fit one fixed batch `steps` times: a model that learns memorises it, so the loss falls."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, weighted_metrics=[])
    return [float(model.train_on_batch(x, y, sample_weight=sample_weight)) for _ in range(steps)]


def lm_and_data(cfg):
    model = build(cfg, lambda: families.build_causal_lm(cfg.model, cfg.data.vocabulary_size))
    return model, families.causal_lm_batch(*token_batch())


def classifier_and_data(cfg, pooling=None):
    model = build(cfg, lambda: families.build_classifier(cfg.model, cfg.data.vocabulary_size, 2, pooling))
    ids, mask = token_batch()
    labels = (np.arange(BATCH) % 2).astype("float32")[:, None]
    return model, ({"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}, labels, None)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", SIZES)
def test_every_family_and_size_composes_and_validates(family, size):
    cfg = compose_config(f"model={family}_{size}", "data=synthetic", "data.sequence_length=128")
    validate(cfg)
    model = cfg.model
    assert (model.family, model.size, model_name(model)) == (family, size, f"{family}_{size}")
    assert model.preset is None
    assert (model.num_key_value_heads is not None) == (family in ("llama", "gemma"))
    assert (model.head_dim is not None) == (family == "gemma")
    purpose, example = (CONF / "model" / f"{family}_{size}.yaml").read_text().splitlines()[:2]
    assert purpose.startswith("# ") and example.startswith(f"#   python -m fp8exp model={family}_{size} ")
    validate(compose_config(*example.split()[4:]))  # the YAML's own example command is valid


def test_the_reference_classifier_stays_the_default():
    cfg = compose_config()
    assert (cfg.model.family, cfg.model.size, model_name(cfg.model)) == ("classifier", "tiny", "tiny")
    assert cfg.model.num_key_value_heads is None and cfg.model.preset is None


def test_sizes_override_like_the_classifiers():
    cfg = compose_config("model=llama_small", "model.hidden_dim=512", "model.num_layers=4",
                         "model.num_key_value_heads=2", "data=synthetic")
    validate(cfg)
    assert (cfg.model.hidden_dim, cfg.model.num_layers, cfg.model.num_key_value_heads) == (512, 4, 2)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "float8"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_learns_in_float32_and_float8(family, precision):
    """Decoders as causal LMs ({"token_ids","padding_mask"} -> logits, from-logits cross-entropy),
    BERT (an encoder: no causal LM) as a classifier."""
    cfg = tiny(family, precision, "model.dropout=0.0")
    if family == "bert":
        model, (x, y, weight) = classifier_and_data(cfg)
        loss = loss_for(2)
    else:
        model, (x, y, weight) = lm_and_data(cfg)
        loss = families.causal_lm_loss()
    quantized = {entry.layer for entry in scale_variables(model)}
    if precision == "float8":
        assert quantized == expected_fp8_layers(family)
        assert quantized == {layer.path for layer in policy.quantizable_layers(model)}
        tensors = {(entry.layer, entry.tensor) for entry in scale_variables(model)}
        assert tensors == {(layer, tensor) for layer in quantized for tensor in SCALED_TENSORS}
    else:
        assert not quantized and {layer.path for layer in policy.quantizable_layers(model)} == \
            expected_fp8_layers(family)
    losses = train(model, loss, x, y, weight)
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < 0.8 * losses[0], losses
    if precision == "float8":
        moved = [entry for entry in scale_variables(model)
                 if float(keras.ops.convert_to_numpy(entry.scale.value)) != 1.0]
        assert {entry.layer for entry in moved} == quantized  # every quantized layer's scales follow its tensors


@pytest.mark.slow
def test_decoder_classifier_head_learns_from_the_last_token():
    cfg = tiny("llama", "float8", "model.dropout=0.0")
    model, (x, y, _) = classifier_and_data(cfg)
    assert "head" in {entry.layer for entry in scale_variables(model)}
    losses = train(model, loss_for(2), x, y)
    assert losses[-1] < 0.8 * losses[0], losses


def test_sequence_pooling_reads_only_tokens_the_mask_keeps():
    sequence = np.arange(2 * 4 * 3, dtype="float32").reshape(2, 4, 3)
    mask = np.array([[True, True, False, False], [False, True, True, True]])  # right and left padding
    pool = {mode: keras.ops.convert_to_numpy(families.SequencePooling(mode)(sequence, mask))
            for mode in families.POOLINGS}
    np.testing.assert_array_equal(pool["last"], [sequence[0, 1], sequence[1, 3]])
    np.testing.assert_array_equal(pool["first"], sequence[:, 0])
    np.testing.assert_allclose(pool["mean"], [sequence[0, :2].mean(0), sequence[1, 1:].mean(0)])


@pytest.mark.slow
def test_a_saved_preset_loads_and_trains_on(tmp_path, monkeypatch):
    cfg = tiny("gpt2", "float32", "model.dropout=0.0")
    model, (x, y, weight) = lm_and_data(cfg)
    before = train(model, families.causal_lm_loss(), x, y, weight)
    model.backbone.save_to_preset(str(tmp_path / "gpt2_base_en"))
    trained = model.evaluate(x, y, sample_weight=weight, verbose=0)

    # A relative path named like a keras-hub built-in preset is read from disk, never downloaded.
    monkeypatch.chdir(tmp_path)
    cfg = tiny("gpt2", "float32", "model.preset=gpt2_base_en")  # validates the directory
    loaded = build(cfg, lambda: families.build_causal_lm(cfg.model, VOCAB))
    loaded.compile(loss=families.causal_lm_loss(), weighted_metrics=[])
    assert loaded.evaluate(x, y, sample_weight=weight, verbose=0) == pytest.approx(trained, rel=1e-5)
    after = train(loaded, families.causal_lm_loss(), x, y, weight, steps=4)
    assert after[-1] < before[-1], (before, after)
    assert families.model_sizes(loaded.backbone)["hidden_dim"] == 64


@pytest.mark.slow
def test_an_fp8_preset_loads_its_weights_and_trains_on_in_float8(tmp_path):
    """keras-hub's own from_preset cannot read a backbone saved after FP8 quantization; load_preset
    takes its float weights (the FP8 state is dropped and starts afresh) under any precision."""
    cfg = tiny("llama", "float8", "model.dropout=0.0", "precision.amax_history_length=8")
    model, (x, y, weight) = lm_and_data(cfg)
    before = train(model, families.causal_lm_loss(), x, y, weight)
    model.backbone.save_to_preset(str(tmp_path / "llama"))

    cfg = tiny("llama", "float8", f"model.preset={tmp_path / 'llama'}")
    loaded = build(cfg, lambda: families.build_causal_lm(cfg.model, VOCAB))
    saved = {w.path: keras.ops.convert_to_numpy(w) for w in model.backbone.weights if w.path.endswith("kernel")}
    for weight_ in loaded.backbone.weights:
        if weight_.path in saved:
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(weight_), saved.pop(weight_.path))
    assert not saved
    assert {entry.layer for entry in scale_variables(loaded)} == expected_fp8_layers("llama")
    after = train(loaded, families.causal_lm_loss(), x, y, weight, steps=4)
    assert np.isfinite(after).all() and after[0] < 0.8 * before[0], (before, after)  # the trained weights
    assert after[-1] < after[0], after                                               # and it learns on

    with policy.global_policy("float32"):
        plain = families.load_preset(str(tmp_path / "llama"))
    assert isinstance(plain, families.BACKBONES["llama"]) and not scale_variables(plain)


def test_causal_lm_needs_a_decoder():
    with pytest.raises(ConfigError, match=r"^model.family: bert cannot do task=causal_lm .*gpt2, llama, gemma"):
        families.build_causal_lm(tiny("bert").model, VOCAB)
    with pytest.raises(ConfigError, match="classifier cannot do task=causal_lm"):
        check_task("classifier", "causal_lm")
    check_task("gemma", "causal_lm")


def write_preset(directory, class_name="GPT2Backbone", weights=True, **config):
    """A hand-written preset directory: config.json as save_to_preset writes it, an empty weights file."""
    directory.mkdir(parents=True, exist_ok=True)
    body = {"vocabulary_size": 1000, "max_sequence_length": 256, **config}
    (directory / "config.json").write_text(json.dumps(
        {"module": "keras_hub.src.models", "class_name": class_name, "config": body,
         "registered_name": f"keras_hub>{class_name}"}))
    if weights:
        (directory / "model.weights.h5").write_bytes(b"")
    return directory


def write_file(directory, name, text):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text)
    return directory


INT8 = {"dtype": {"class_name": "DTypePolicyMap", "config": {"policy_map": {
    "transformer_layer_0/self_attention/query": {"class_name": "QuantizedDTypePolicy", "config": {"mode": "int8"}}}}}}

# name -> (model, the preset directory made in tmp, key, words of the one-line error)
PRESET_CASES = {
    "missing": ("gpt2_tiny", lambda tmp: tmp / "nowhere", "model.preset", "no directory"),
    "empty": ("gpt2_tiny", lambda tmp: write_file(tmp, "notes.txt", ""), "model.preset", "has no config.json"),
    "damaged_json": ("gpt2_tiny", lambda tmp: write_file(tmp, "config.json", "{not json"), "model.preset",
                     "not readable JSON"),
    "hugging_face": ("gpt2_tiny", lambda tmp: write_file(tmp, "config.json", '{"model_type": "gpt2"}'),
                     "model.preset", "Hugging Face Transformers checkpoint"),
    "no_weights": ("gpt2_tiny", lambda tmp: write_preset(tmp, weights=False), "model.preset",
                   "no weights (model.weights.h5 or model.weights.json): the preset is incomplete"),
    "other_family": ("gpt2_tiny", lambda tmp: write_preset(tmp, "BertBackbone"), "model.preset",
                     "holds a BertBackbone, not a GPT2Backbone (model.family=gpt2); use model=bert_<size>"),
    "unknown_architecture": ("llama_tiny", lambda tmp: write_preset(tmp, "ViTBackbone"), "model.preset",
                             "holds a ViTBackbone, not a LlamaBackbone (model.family=llama); fp8exp builds none"),
    "int8": ("gpt2_tiny", lambda tmp: write_preset(tmp, **INT8), "model.preset", "quantized to int8"),
    "remote": ("gpt2_tiny", lambda tmp: "hf://openai-community/gpt2", "model.preset", "remote handle"),
    "short_positions": ("gpt2_tiny", lambda tmp: write_preset(tmp, max_sequence_length=16), "data.sequence_length",
                        "32 is longer than the max_sequence_length=16 of the preset"),
    "small_vocabulary": ("gpt2_tiny", lambda tmp: write_preset(tmp, vocabulary_size=100), "data.vocabulary_size",
                         "128 is more than the vocabulary_size=100 of the preset"),
}


SETTING_CASES = [
    (["model=gpt2_tiny", "model.family=gpt3"], "model.family", "unknown family 'gpt3'; valid: classifier, gpt2"),
    (["model=gpt2_tiny", "model.num_key_value_heads=2"], "model.num_key_value_heads",
     "model.family=gpt2 has no num_key_value_heads (only llama, gemma do); remove it"),
    (["model=bert_tiny", "model.num_key_value_heads=1"], "model.num_key_value_heads", "model.family=bert has no"),
    (["model=llama_tiny", "model.head_dim=16"], "model.head_dim", "model.family=llama has no head_dim (only gemma"),
    (["model=tiny", "model.max_sequence_length=64"], "model.max_sequence_length", "model.family=classifier has no"),
    (["model=tiny", "model.preset=/tmp"], "model.preset", "model.family=classifier has no preset"),
    (["model=gpt2_tiny", "model.hidden_dim=65"], "model.hidden_dim", "65 is not divisible by model.num_heads=2"),
    (["model=llama_tiny", "model.num_heads=6"], "model.hidden_dim", "64 is not divisible by model.num_heads=6"),
    (["model=llama_tiny", "model.num_key_value_heads=3"], "model.num_key_value_heads",
     "3 does not divide model.num_heads=4; valid: 1, 2, 4"),
    (["model=gemma_tiny", "model.num_key_value_heads=3"], "model.num_key_value_heads", "does not divide"),
    (["model=llama_tiny", "model.hidden_dim=60"], "model.hidden_dim", "odd width 15; llama's rotary"),
    (["model=gemma_tiny", "model.head_dim=15"], "model.head_dim", "odd width 15"),
    (["model=gemma_tiny", "model.intermediate_dim=255"], "model.intermediate_dim", "255 is odd"),
    (["model=gpt2_tiny", "data.sequence_length=300"], "data.sequence_length",
     "300 is longer than model.max_sequence_length=256"),
    (["model=llama_tiny", "model.max_sequence_length=16"], "data.sequence_length",
     "32 is longer than model.max_sequence_length=16"),
    (["model=bert_tiny", "model.max_sequence_length=0"], "model.max_sequence_length", "positive"),
    (["model=gemma_tiny", "model.head_dim=0"], "model.head_dim", "positive integer or null"),
]


def assert_one_line_error(cfg, key, words):
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    message = str(error.value)
    assert error.value.key == key and message.startswith(f"{key}: ") and "\n" not in message, message
    assert words in message, message


@pytest.mark.parametrize("overrides,key,words", SETTING_CASES)
def test_bad_model_settings_are_one_line_naming_the_key(overrides, key, words):
    cfg = compose_config("data=synthetic", f"data.sequence_length={LENGTH}", f"data.vocabulary_size={VOCAB}",
                         *overrides)
    assert_one_line_error(cfg, key, words)


@pytest.mark.parametrize("case", PRESET_CASES)
def test_bad_presets_are_one_line_naming_the_key(case, tmp_path):
    model, make, key, words = PRESET_CASES[case]
    cfg = compose_config(f"model={model}", f"model.preset={make(tmp_path / 'preset')}", "data=synthetic",
                         f"data.sequence_length={LENGTH}", f"data.vocabulary_size={VOCAB}")
    assert_one_line_error(cfg, key, words)


def test_load_preset_refuses_a_damaged_file_in_one_line(tmp_path):
    directory = write_preset(tmp_path / "damaged", vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=8,
                             intermediate_dim=8)
    with pytest.raises(ConfigError, match=r"^model.preset: .* could not be loaded as a GPT2Backbone") as error:
        families.load_preset(str(directory), "gpt2")
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_task_classify_runs_on_a_family_with_fp8_state_and_probe(store):
    """task=classify through the runner on llama_tiny in float8: it learns the synthetic labels, and
    the probe measures the output gradients too (with the loss the model trains with)."""
    from mlflow.tracking import MlflowClient

    from fp8exp.run.experiment import run_experiment
    from tests.conftest import tracked

    cfg = tracked(store, "model=llama_tiny", "precision=float8", "tracking.experiment=family_classify",
                  "tracking.fp8_log_every=8", "tracking.save_model=false", "tracking.fp8_gemm_check=false")
    validate(cfg)
    outcome = run_experiment(cfg)
    run = MlflowClient(cfg.tracking.uri).get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert outcome.metrics["test/accuracy"] > 0.7  # the synthetic task's signal tokens are learned
    metrics = run.data.metrics
    query = "transformer_layer_0/self_attention/query"
    for tensor in ("inputs", "kernel", "outputs_grad"):
        assert f"fp8/{query}/{tensor}_scale" in metrics
        assert np.isfinite(metrics[f"fp8/{query}/{tensor}_sqnr_db"]), tensor


def _hand_counted_fp8_share(family: str, skip_feedforward: bool = False, length: int = LENGTH,
                            vocabulary: int = VOCAB) -> float:
    """FLOPs per example, counted by hand from llama_tiny / gemma_tiny: FP8 projections over all
    matmuls (+ attention scores QK^T and AV, + the tied embedding as the LM head); with
    `skip_feedforward` the feed-forward projections stay in high precision but still count."""
    d, heads, head_dim, layers = 64, 4, 16, 2
    kv, ff = (2, 192) if family == "llama" else (1, 128)
    attention_projections = d * heads * head_dim * 2 + 2 * d * kv * head_dim  # q, o; k, v
    feedforward = 3 * d * ff  # gate, up, down
    fp8 = 2 * length * (attention_projections + (0 if skip_feedforward else feedforward)) * layers
    total = 2 * length * (attention_projections + feedforward) * layers
    attention = 2 * 2 * length * length * heads * head_dim * layers
    head = 2 * length * d * vocabulary
    return fp8 / (total + attention + head)


@pytest.mark.parametrize("family,skip", [("llama", None), ("gemma", None), ("llama", "feedforward")])
def test_layer_table_counts_attention_scores_and_the_lm_head(family, skip):
    from fp8exp.precision.health import layer_table
    from fp8exp.precision.probe import Probe

    cfg = compose_config(f"model={family}_tiny", "precision=float8", "task=causal_lm",
                         *([f"precision.skip={skip}"] if skip else []))
    model = build(cfg, lambda: families.build_causal_lm(cfg.model, VOCAB))
    ids = np.random.default_rng(0).integers(1, VOCAB, (2, LENGTH + 1)).astype("int32")
    x, _, _ = families.causal_lm_batch(ids)
    probe = Probe(model, x)
    probe.run()
    table = layer_table(model, probe.captures, probe.matmul_shapes())
    assert "(in reverse: the output projection) | LM head matmul | compute dtype" in table
    assert table.count("(scores QK^T and AV) | attention matmul") == 2
    share = float(table.rsplit("and ", 1)[1].split("%")[0]) / 100
    assert share == pytest.approx(_hand_counted_fp8_share(family, skip_feedforward=bool(skip)), abs=0.0005)

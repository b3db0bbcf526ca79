"""keras-hub model families, built from the `model` config group: GPT-2, Llama and Gemma
(decoder-only) and BERT (encoder-only), randomly initialised at the configured sizes or loaded
from a preset directory on disk.

    backbone = build_backbone(cfg.model, vocabulary_size)          # the bare keras-hub Backbone
    lm = build_causal_lm(cfg.model, vocabulary_size)               # gpt2 / llama / gemma only
    clf = build_classifier_head(backbone, num_classes)             # any family: Dense head on top

Every model takes `{"token_ids", "padding_mask"}` batches (int32 ids, boolean mask; BERT's segment
ids are zeros). Built under whatever dtype policy is global at call time, like classifier.py:
precision/policy.py decides that policy and quantizes the Dense/EinsumDense layers afterwards.
Embeddings (also the tied LM head: a ReversibleEmbedding used in reverse) and norms stay in high
precision. Each config value maps to one explicit constructor argument below; nothing is built
through `_target_`.
"""

from __future__ import annotations

import os

import keras
import keras_hub
import numpy as np
from omegaconf import DictConfig

from fp8exp.config import ConfigError
from fp8exp.config.checks import check_task, read_preset
from fp8exp.models.pooling import POOLINGS, SequencePooling

BACKBONES = {
    "gpt2": keras_hub.models.GPT2Backbone,
    "llama": keras_hub.models.LlamaBackbone,
    "gemma": keras_hub.models.GemmaBackbone,
    "bert": keras_hub.models.BertBackbone,
}
CAUSAL_LMS = {
    "gpt2": keras_hub.models.GPT2CausalLM,
    "llama": keras_hub.models.LlamaCausalLM,
    "gemma": keras_hub.models.GemmaCausalLM,
}


def build_backbone(model: DictConfig, vocabulary_size: int) -> keras_hub.models.Backbone:
    """The family's keras-hub backbone: loaded from `model.preset` when set (its architecture and
    weights), else random weights at the configured sizes. Token ids must be below vocabulary_size."""
    family = model.family
    if family not in BACKBONES:
        raise ConfigError("model.family", f"{family!r} is not a keras-hub family; valid: {', '.join(BACKBONES)}")
    if model.get("preset"):
        backbone = load_preset(model.preset, family)
        if backbone.vocabulary_size < vocabulary_size:
            raise ConfigError("data.vocabulary_size", f"{vocabulary_size} is more than the vocabulary_size="
                              f"{backbone.vocabulary_size} of the preset {model.preset}; use at most "
                              f"{backbone.vocabulary_size}")
        return backbone
    # What every family takes alike; then what tells them apart (query/key-value heads, head width,
    # a learned position table), mapped to each class's own argument names.
    shared = {"vocabulary_size": vocabulary_size, "num_layers": model.num_layers, "hidden_dim": model.hidden_dim,
              "intermediate_dim": model.intermediate_dim, "dropout": model.dropout}
    if family in ("gpt2", "bert"):
        return BACKBONES[family](**shared, num_heads=model.num_heads, max_sequence_length=model.max_sequence_length)
    heads = {"num_query_heads": model.num_heads, "num_key_value_heads": model.num_key_value_heads or model.num_heads}
    if family == "llama":
        return BACKBONES[family](**shared, **heads)
    return BACKBONES[family](**shared, **heads, head_dim=model.head_dim or model.hidden_dim // model.num_heads)


def build_causal_lm(model: DictConfig, vocabulary_size: int) -> keras_hub.models.CausalLM:
    """GPT2CausalLM / LlamaCausalLM / GemmaCausalLM over build_backbone(), without a preprocessor:
    it maps `{"token_ids", "padding_mask"}` to logits over the vocabulary (batch, length, vocab),
    through the embedding used in reverse. Train it with causal_lm_loss() on causal_lm_batch()."""
    check_task(model.family, "causal_lm")
    return CAUSAL_LMS[model.family](backbone=build_backbone(model, vocabulary_size), preprocessor=None)


def causal_lm_loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def causal_lm_batch(token_ids, padding_mask=None) -> tuple[dict, object, object]:
    """Next-token prediction on `length + 1` tokens: inputs are tokens [0, length), labels tokens
    [1, length], weighted by the labels' padding mask. Returns (x, y, sample_weight) for fit()."""
    token_ids = keras.ops.convert_to_numpy(token_ids)
    padding_mask = token_ids != 0 if padding_mask is None else keras.ops.convert_to_numpy(padding_mask)
    x = {"token_ids": token_ids[:, :-1], "padding_mask": padding_mask[:, :-1]}
    return x, token_ids[:, 1:], padding_mask[:, 1:].astype("float32")


def classifier_inputs(token_ids: np.ndarray, pad: int = 0) -> dict[str, np.ndarray]:
    """Padded ids (as task=classify prepares them) -> a family's inputs; the mask marks non-padding."""
    token_ids = np.asarray(token_ids, np.int32)
    return {"token_ids": token_ids, "padding_mask": token_ids != pad}


def build_classifier_head(backbone: keras_hub.models.Backbone, num_classes: int, pooling: str | None = None,
                          dropout: float = 0.1) -> keras.Model:
    """`classify` on a backbone: `{"token_ids", "padding_mask"}` -> pooled representation ->
    Dropout -> Dense `head` (one sigmoid unit for two classes, else a softmax, as the reference
    classifier; its loss is classifier.loss_for(num_classes)). Pooling: BERT's pooled [CLS] output
    (the backbone's own tanh `pooled_dense`) by default, decoders the last non-padding token;
    `mean` or `first` on request."""
    is_bert = isinstance(backbone, keras_hub.models.BertBackbone)
    pooling = pooling or ("pooled" if is_bert else "last")
    if pooling not in (*POOLINGS, *(("pooled",) if is_bert else ())):
        raise ValueError(f"pooling {pooling!r}; valid: {', '.join(POOLINGS)}{', pooled' if is_bert else ''}")
    token_ids = keras.layers.Input(shape=(None,), dtype="int32", name="token_ids")
    padding_mask = keras.layers.Input(shape=(None,), dtype="bool", name="padding_mask")
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    if is_bert:
        outputs = backbone({**inputs, "segment_ids": keras.ops.zeros_like(token_ids)})
        x = outputs["pooled_output"] if pooling == "pooled" else \
            SequencePooling(pooling, name="pooling")(outputs["sequence_output"], padding_mask)
    else:
        x = SequencePooling(pooling, name="pooling")(backbone(inputs), padding_mask)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    if num_classes == 2:
        outputs = keras.layers.Dense(1, activation="sigmoid", name="head")(x)
    else:
        outputs = keras.layers.Dense(num_classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name=f"fp8exp_{backbone.name}_classifier")


def build_classifier(model: DictConfig, vocabulary_size: int, num_classes: int,
                     pooling: str | None = None) -> keras.Model:
    """build_classifier_head() on build_backbone(), with the model's dropout before the head."""
    check_task(model.family, "classify")
    return build_classifier_head(build_backbone(model, vocabulary_size), num_classes, pooling, model.dropout)


def load_preset(path: str, family: str | None = None) -> keras_hub.models.Backbone:
    """A keras-hub backbone from a preset directory on disk (as Backbone.save_to_preset writes it:
    config.json, model.weights.h5 or sharded model.weights.json), with its weights, built under the
    global dtype policy whatever policy it was saved under. Never downloads: only local directories.
    `family` (default: whatever the preset holds) must match its architecture.

    A preset saved after FP8 quantization holds scales and amax histories too; keras-hub's own
    from_preset cannot load those (its layers build unquantized). Here its layers are quantized as
    saved to read the file, and the float weights are then moved into an unquantized backbone: the
    FP8 state is dropped, and whichever precision the run asks for is applied as for a fresh model."""
    config = read_preset(path, family)
    family = config["family"]
    # Absolute: keras-hub reads a bare name such as `gpt2_base_en` as a built-in preset to download.
    directory = os.path.abspath(os.path.expanduser(str(path)))
    weights = os.path.join(directory, "model.weights.h5")
    if not os.path.isfile(weights):
        weights = os.path.join(directory, "model.weights.json")
    fp8_layers = _float8_layers(config)
    cls = BACKBONES[family]
    try:
        backbone = cls.from_preset(directory, load_weights=False, dtype=keras.config.dtype_policy())
        if not fp8_layers:
            backbone.load_weights(weights)
            return backbone
        saved = cls.from_preset(directory, load_weights=False, dtype=keras.config.dtype_policy())
        for layer in saved._flatten_layers(include_self=False):
            if layer.path in fp8_layers:
                layer.dtype_policy = keras.dtype_policies.QuantizedFloat8DTypePolicy(
                    "float8", keras.config.dtype_policy().name, amax_history_length=fp8_layers[layer.path])
        saved.load_weights(weights)
    except (OSError, ValueError, KeyError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError("model.preset", f"{directory} could not be loaded as a {cls.__name__} ({first}); "
                          "save it again with Backbone.save_to_preset") from error
    values = {weight.path: weight for weight in saved.weights}
    for weight in backbone.weights:
        weight.assign(values[weight.path])
    return backbone


def _float8_layers(config: dict) -> dict[str, int]:
    """Layer path -> amax history length of the float8-quantized layers a preset was saved with."""
    dtype = config.get("dtype")
    if not (isinstance(dtype, dict) and dtype.get("class_name") == "DTypePolicyMap"):
        return {}
    entries = dtype.get("config", {}).get("policy_map", {})
    return {path: entry["config"].get("amax_history_length", 1024) for path, entry in entries.items()
            if entry.get("config", {}).get("mode") == "float8"}


def model_sizes(backbone: keras_hub.models.Backbone) -> dict[str, int | None]:
    """The built backbone's shape under the `model.*` key names (what a preset really holds, for
    logging when `model.preset` fixed the architecture)."""
    config = backbone.get_config()
    family = next(name for name, cls in BACKBONES.items() if isinstance(backbone, cls))
    sizes = {
        "hidden_dim": config["hidden_dim"],
        "num_heads": config.get("num_heads", config.get("num_query_heads")),
        "intermediate_dim": config["intermediate_dim"],
        "num_layers": config["num_layers"],
        "dropout": config.get("dropout"),
        "num_key_value_heads": config.get("num_key_value_heads"),
        "head_dim": config.get("head_dim"),
        "max_sequence_length": config.get("max_sequence_length"),
        "vocabulary_size": config["vocabulary_size"],
    }
    return {"family": family, **sizes}

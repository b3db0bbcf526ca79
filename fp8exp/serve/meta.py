"""What a saved model's `fp8exp_model.json` holds (textmodel/__init__.py lists the files): format,
versions, task, precision, tokenizer, lengths, class names or end-of-text id, and its FP8 layers,
Keras-quantized (their dtype policies) or running a recipe (their class and recipe), which a loader
restores where the model's own config does not (textmodel/files.py)."""

from __future__ import annotations

from fp8exp.serve import textmodel
from fp8exp.serve.textmodel import FORMAT, TOKENIZER_FILES


def quantized_layers(net) -> dict[str, dict]:
    """Layer path -> serialized dtype policy, for every layer whose policy quantizes."""
    import keras

    return {layer.path: keras.dtype_policies.serialize(layer.dtype_policy)
            for layer in net._flatten_layers(include_self=False)
            if getattr(layer.dtype_policy, "quantization_mode", None)}


def recipe_layers(net) -> dict[str, dict]:
    """Layer path -> registered class and recipe config, for every layer an FP8 recipe runs in: a
    loader makes those a keras-hub block rebuilt as plain Dense/EinsumDense recipe layers again."""
    import keras

    from fp8exp.precision.recipes.layers import recipe_layers as layers

    return {layer.path: {"class_name": keras.saving.get_registered_name(type(layer)), **layer.recipe_config()}
            for layer in layers(net)}


def describe(net, *, precision: str, class_names: list[str], sequence_length: int, lowercase: bool,
             vocabulary_size: int, has_vocabulary: bool, fp8exp_version: str, run_id: str | None = None,
             task: str = "classify", tokenizer: str | None = None, end_of_text_id: int | None = None,
             max_length: int | None = None, special_tokens: list[str] | None = None) -> dict:
    """The metadata `fp8exp_model.json` holds. `tokenizer`: wordpiece (the default for a model with
    a vocabulary) | bpe | None (token ids). Language models: `end_of_text_id` (generation stops
    there; every prompt starts after it) and `max_length` (prompt and continuation together)."""
    from importlib import metadata

    tokenizer = (tokenizer or "wordpiece") if has_vocabulary else None
    recipes = recipe_layers(net)
    return {
        "format": textmodel.files.RECIPE_FORMAT if recipes else FORMAT,
        "fp8exp_version": fp8exp_version,
        "keras_version": metadata.version("keras"),
        "keras_hub_version": metadata.version("keras-hub"),
        "run_id": run_id,
        "task": task,
        "model_class": type(net).__name__,
        "keras_inputs": textmodel.files.IDS_AND_MASK if isinstance(net.input, dict) else "token_ids",
        "precision": precision,
        "dtype_policy": net.dtype_policy.name,
        "class_names": list(class_names),
        "sequence_length": int(sequence_length),
        "max_length": int(max_length or sequence_length),
        "end_of_text_id": None if end_of_text_id is None else int(end_of_text_id),
        "lowercase": bool(lowercase),
        "vocabulary_size": int(vocabulary_size),
        "input": "text" if has_vocabulary else "token_ids",
        "tokenizer": tokenizer,
        "tokenizer_files": sorted(TOKENIZER_FILES.get(tokenizer, {}).values()),
        "special_tokens": list(special_tokens or []),
        "quantized_layers": quantized_layers(net),
        "recipe_layers": recipes,
    }


def describe_run(net, splits, cfg, fp8exp_version: str, run_id: str | None) -> dict:
    """describe() for a run's model and data: a language model's end-of-text id and maximum length
    (the trained window); BPE's special token."""
    from fp8exp.data import bpe

    # Prompt and continuation stay within the positions training used (data.sequence_length): GPT-2's
    # position rows beyond it were never trained, and rotary models would extrapolate.
    max_length = splits.sequence_length if splits.task == "causal_lm" else None
    return describe(net, precision=cfg.precision.name, class_names=splits.class_names,
                    sequence_length=splits.sequence_length, lowercase=bool(cfg.data.get("lowercase", False)),
                    vocabulary_size=splits.vocabulary_size, has_vocabulary=splits.vocabulary is not None,
                    fp8exp_version=fp8exp_version, run_id=run_id, task=splits.task, tokenizer=splits.tokenizer,
                    end_of_text_id=splits.end_of_text_id, max_length=max_length,
                    special_tokens=[bpe.END_OF_TEXT] if splits.tokenizer == "bpe" else None)

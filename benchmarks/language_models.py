"""The keras-hub families in `make bench` and the GPU kit: BF16 vs float8 tokens per second per
family, fp8exp's overhead on a language model against a plain keras-hub `LlamaCausalLM.fit`, and
the language-model data path (tokenize + pack) against keras-hub's own way. Like common.py, the
timing code needs only JAX, Keras and keras-hub, so the GPU kit runs it offline from wheels."""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import fp8exp  # noqa: F401  (selects the JAX backend before Keras loads)
import keras
import numpy as np
from omegaconf import OmegaConf

from benchmarks.common import CallTimer, data_path_rows, load_times, markdown_table, precision_config, time_steps
from fp8exp.models import families
from fp8exp.precision import gemm as fp8_gemm
from fp8exp.precision import policy as precision

FAMILIES = ("gpt2", "llama", "gemma", "bert")
QUICK_FAMILIES = ("llama", "bert")  # --quick checks the code runs: a decoder and the encoder

# Llama-style shapes the GPU kit measures: Llama 3.2 1B's block, and Llama 3 8B's.
LLAMA_SHAPES = {2048: dict(num_heads=32, num_key_value_heads=8, intermediate_dim=8192),
                4096: dict(num_heads=32, num_key_value_heads=8, intermediate_dim=14336)}


@dataclass
class LmTiming:
    family: str
    precision: str
    hidden_dim: int
    median_ms: float
    tokens_per_s: float
    gemm: str


def model_config(family: str, size: str = "tiny", **overrides):
    """conf/model/<family>_<size>.yaml with `overrides`, as the runner composes it."""
    path = Path(__file__).resolve().parents[1] / "conf" / "model" / f"{family}_{size}.yaml"
    return OmegaConf.merge(OmegaConf.load(path), overrides)


def build(family: str, precision_name: str, model_cfg, vocabulary_size: int) -> keras.Model:
    """A decoder as fp8exp trains it for task=causal_lm; BERT (an encoder) as a two-class classifier."""
    cfg = precision_config(precision_name)
    if family == "bert":
        net = precision.build(cfg, lambda: families.build_classifier(model_cfg, vocabulary_size, 2))
        net.compile(optimizer=precision.optimizer(cfg, 1e-3), loss="binary_crossentropy")
    else:
        net = precision.build(cfg, lambda: families.build_causal_lm(model_cfg, vocabulary_size))
        net.compile(optimizer=precision.optimizer(cfg, 1e-3), loss=families.causal_lm_loss(), weighted_metrics=[])
    return net


def batches(family: str, count: int, sequence: int, vocabulary_size: int, seed: int = 0):
    ids = np.random.default_rng(seed).integers(1, vocabulary_size, (count, sequence + 1)).astype("int32")
    if family == "bert":
        return families.classifier_inputs(ids[:, :-1]), (ids[:, 0] % 2).astype("float32")
    x, y, _ = families.causal_lm_batch(ids, np.ones(ids.shape, bool))
    return x, y


def measure(family: str, precision_name: str, model_cfg, batch: int, sequence: int, steps: int,
            vocabulary_size: int = 8000, check_gemm: bool = True) -> LmTiming:
    """Median step time of `steps` steps after compilation (fp8exp's StepTimer), and the GEMM check."""
    keras.utils.set_random_seed(0)
    net = build(family, precision_name, model_cfg, vocabulary_size)
    x, y = batches(family, batch * steps, sequence, vocabulary_size)
    timer, _ = time_steps(net, x, y, batch, steps)
    median = float(np.median(timer.step_times()))
    gemm = "-"
    if check_gemm and precision_name == "float8":
        first = keras.tree.map_structure(lambda a: a[:batch], x)
        report = fp8_gemm.inspect_train_step(net, first, y[:batch])
        gemm = f"{report.verdict} ({report.fused}/{report.fp8_matmuls})"
    return LmTiming(family, precision_name, int(model_cfg.hidden_dim), median * 1e3, batch * sequence / median, gemm)


def timing_table(timings: list[LmTiming]) -> str:
    """One row per (family, hidden): BF16 and float8 tokens/s and FP8's speed-up."""
    rows = []
    for bf16 in (t for t in timings if t.precision == "mixed_bfloat16"):
        fp8 = next(t for t in timings if t.precision == "float8" and (t.family, t.hidden_dim) == (bf16.family, bf16.hidden_dim))
        rows.append([bf16.family, bf16.hidden_dim, f"{bf16.tokens_per_s:,.0f}", f"{fp8.tokens_per_s:,.0f}",
                     f"{fp8.tokens_per_s / bf16.tokens_per_s:.2f}x", fp8.gemm])
    return markdown_table(["family", "hidden", "BF16 tokens/s", "float8 tokens/s", "FP8 speed-up", "FP8 GEMMs"], rows)


def family_section(quick: bool) -> str:
    size, batch, sequence, steps = ("tiny", 2, 16, 3) if quick else ("small", 8, 128, 10)
    timings = [measure(family, name, model_config(family, size), batch, sequence, steps, check_gemm=not quick)
               for family in (QUICK_FAMILIES if quick else FAMILIES) for name in ("mixed_bfloat16", "float8")]
    return (f"Each family at its `{size}` size (conf/model/<family>_{size}.yaml), random weights, vocabulary 8,000, "
            f"batch {batch} x sequence {sequence}, median of {steps} steps after compilation. The decoders train "
            "as causal language models, BERT as a classifier. **FP8 on this CPU is emulated** (quantize-dequantize "
            "around bf16 matmuls; the last column says no matmul ran as an FP8 GEMM): the speed-up column is "
            "the emulation's cost, not FP8 speed.\n\n" + timing_table(timings) + "\n")


def plain_keras_hub_ms(windows: np.ndarray, vocabulary_size: int, model_cfg, batch: int, steps: int,
                       seed: int) -> float:
    """The same Llama, packed data and precision in a plain keras-hub script: LlamaCausalLM with
    keras-hub's default compile (loss from logits, token accuracy), quantized with Keras' float8."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        backbone = keras_hub.models.LlamaBackbone(
            vocabulary_size=vocabulary_size, num_layers=model_cfg.num_layers, num_query_heads=model_cfg.num_heads,
            hidden_dim=model_cfg.hidden_dim, intermediate_dim=model_cfg.intermediate_dim,
            num_key_value_heads=model_cfg.num_key_value_heads, dropout=model_cfg.dropout)
        lm = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    finally:
        keras.config.set_dtype_policy("float32")
    lm.quantize("float8")
    lm.compile(optimizer=keras.optimizers.Adam(1e-3))
    windows = np.resize(windows, (batch * steps, windows.shape[1]))  # as many steps as fp8exp's epoch
    x = {"token_ids": windows[:, :-1], "padding_mask": np.ones(windows[:, :-1].shape, bool)}
    timer = CallTimer()
    lm.fit(x, windows[:, 1:], batch_size=batch, epochs=1, steps_per_epoch=steps, shuffle=True, verbose=0,
           callbacks=[timer])
    return statistics.median(timer.times[1:]) * 1e3


def overhead_section(quick: bool, compose) -> str:
    """fp8exp's median step time for llama_tiny (float8, FP8 logging and probe at their defaults)
    over the plain keras-hub script's, on the same packed windows, interleaved."""
    from fp8exp.data import load
    from fp8exp.run.experiment import run_experiment

    steps, sequence, batch, reps = (12, 16, 8, 1) if quick else (300, 64, 16, 3)
    ratios, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose("task=causal_lm", "model=llama_tiny", "precision=float8", "data=synthetic",
                      f"data.sequence_length={sequence}", "data.vocabulary_size=2000",
                      f"data.num_train={steps * batch}", "data.num_validation=64",
                      "data.num_test=64", "trainer.epochs=1", f"trainer.steps_per_epoch={steps}",
                      f"trainer.batch_size={batch}", "trainer.eval_steps=1",
                      f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_root={tmp}/artifacts")
        splits = load(cfg.data, "causal_lm")
        for rep in range(reps):
            ours = run_experiment(cfg).metrics["perf/step_time_ms"]
            plain = plain_keras_hub_ms(splits.x_train, splits.vocabulary_size, cfg.model, batch, steps,
                                       cfg.trainer.seed)
            ratios.append(ours / plain)
            rows.append([rep + 1, f"{ours:.2f}", f"{plain:.2f}", f"{ours / plain:.3f}"])
    return (f"task=causal_lm, llama_tiny, float8, sequence {sequence}, batch {batch}, {steps} steps: fp8exp "
            "(FP8 logging every 100 steps, the probe on) against a plain keras-hub script "
            "(`LlamaCausalLM(preprocessor=None)`, `quantize(\"float8\")`, default `compile`, `fit`) on the same "
            "packed windows, interleaved.\n\n"
            + markdown_table(["rep", "fp8exp median ms/step", "keras-hub median ms/step", "ratio"], rows)
            + f"\n\n**Median ratio {statistics.median(ratios):.3f}** (goal: at most 1.03).\n")


def data_section(quick: bool, compose, corpus) -> str:
    """The shared corpus to packed causal_lm windows: keras-hub's way (it has no BPE trainer:
    compute_sentence_piece_proto, then SentencePieceTokenizer over tf.data) and fp8exp's (byte-level
    BPE with the Rust trainer, encode, pack, cache), cold (median of 3, each into an empty cache)."""
    import pandas as pd
    import tensorflow as tf
    import keras_hub

    from fp8exp.data import bpe, load, sources

    if not corpus.is_file():
        return f"Skipped: {corpus} is absent.\n"
    vocabulary, sequence = (500, 32) if quick else (8000, 128)
    frame = pd.read_parquet(corpus)[:500 if quick else None]
    with tempfile.TemporaryDirectory() as tmp:
        table = f"{tmp}/reviews.parquet"
        frame.to_parquet(table)
        settings = ("task=causal_lm", "model=llama_tiny", "data=table", f"data.path={table}", "data.text_column=text",
                    f"data.vocabulary_size={vocabulary}", f"data.sequence_length={sequence}")
        raw = sources.read_table(Path(table), compose(*settings).data)
        train_texts = [text.lower() for text in raw.texts["train"]]
        all_texts = [text.lower() for split in raw.texts.values() for text in split]

        started = time.perf_counter()
        proto = keras_hub.tokenizers.compute_sentence_piece_proto(
            tf.data.Dataset.from_tensor_slices(train_texts), vocabulary_size=vocabulary)
        vocab_seconds = time.perf_counter() - started
        tokenizer = keras_hub.tokenizers.SentencePieceTokenizer(proto=proto)
        tokens = sum(int(np.asarray(ids).size) for ids in tf.data.Dataset.from_tensor_slices(all_texts).batch(256)
                     .map(lambda texts: tokenizer(texts).flat_values, num_parallel_calls=tf.data.AUTOTUNE))
        keras_hub_total = time.perf_counter() - started

        colds, cached, splits = load_times(
            lambda attempt: load(compose(*settings, f"data.cache_dir={tmp}/cache-{attempt}").data, "causal_lm"),
            1 if quick else 3)
    # Where fp8exp's cold time goes: the Rust `tokenizers` BPE trainer and encoder (the library
    # keras-hub's own BytePairTokenizer runs on) against the rest (read, split, pack, cache).
    started = time.perf_counter()
    vocabulary_and_merges = bpe.train(train_texts, vocabulary)
    train_seconds = time.perf_counter() - started
    bpe.encode(all_texts, *vocabulary_and_merges)
    encode_seconds = time.perf_counter() - started - train_seconds
    cold, hit = statistics.median(colds), statistics.median(cached)
    rows = data_path_rows("keras-hub (compute_sentence_piece_proto + SentencePieceTokenizer over tf.data, no packing)",
                          vocab_seconds, keras_hub_total,
                          "fp8exp, cold (read, split, byte-level BPE trained and applied, packed, cached)", colds, cached)
    return (f"{len(frame):,} clothing reviews (`../shared/data`), vocabulary {vocabulary:,}, windows of "
            f"{sequence} + 1 tokens. keras-hub has no BPE trainer, so its row trains a SentencePiece model on the "
            f"same {len(train_texts):,}-row training split and tokenizes every row ({tokens:,} tokens), starting "
            f"from texts in memory; fp8exp's also reads the file, splits it, packs {len(splits.y_train):,} training "
            "windows and writes the cache.\n\n"
            + markdown_table(["path", "vocabulary s", "raw to windows s"], rows)
            + f"\n\nCold speed-up {keras_hub_total / cold:.1f}x (goal 10x); cached {hit:.2f} s. Of fp8exp's cold "
            f"time, training the byte-level BPE takes {train_seconds:.2f} s and encoding every row with it "
            f"{encode_seconds:.2f} s, both in the Rust `tokenizers` library on both cores; the rest "
            f"({max(cold - train_seconds - encode_seconds, 0):.2f} s) reads, splits, packs and caches.\n")

"""task=causal_lm's byte-level BPE: training ids come from the Rust `tokenizers` library, inference
ids from keras-hub's BytePairTokenizer called eagerly; both must agree, on the shared corpus and on
awkward Unicode, or a served language model reads other tokens than it learned from. And a byte-level
vocabulary writes every text back: nothing is unknown, nothing is dropped."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from tokenizers import pre_tokenizers

from fp8exp import data
from fp8exp.config import ConfigError, validate
from fp8exp.data import bpe
from tests.conftest import CLOTHING, compose_config, needs_clothing

CORPUS = ["the dress fits well, true to size!", "love the color; runs small... (ordered a 6)",
          "fabric is thin & itchy: returned it", "perfect for summer \u2014 5 stars", "it's 5'4\" and 120lbs",
          "line one\n  two\n\n  three", "ok\r\nnext\r\n", "('sand' said) 's 't"] * 10

# Where a tokenizer that splits words (GPT-2's regex, keras-hub's TensorFlow path) would part from
# one that does not (keras-hub's eager path): whitespace runs, line ends, contractions, digits;
# and where byte handling could: non-ASCII letters, combining marks, emoji, CJK, control characters,
# no-break spaces, the end-of-text token written in the text, the markers keras-hub's TF path uses.
AWKWARD = [
    "", " ", "   ", "\n", "\n\n\n", "\t\t", " \t \n ", "a  b", "a   b", "x\n\n  y", "line one\n  two",
    "trailing  ", "  leading", "ok\r\nnext", "tab\tnew\nline\x0bvt\x0cff\x85nel",
    "it's don't we'll I'M they'VE", "('sand' said)", "x's 's't", "5'4\" and 120lbs", "12345 1,000.50 3.14e-10",
    "na\u00efve caf\u00e9", "e\u0301 a\u0300\u0301", "\u00c5ngstr\u00f6m \u0434\u043e\u043c \u05e9\u05dc\u05d5\u05dd",
    "emoji \U0001F600\U0001F44D\U0001F3FD ok \U0001F468\u200D\U0001F469\u200D\U0001F467",
    "\u4e2d\u6587\u5b57\u7b26 mixed\u65e5\u672c \U00020000\U00020001", "a\u00a0b \u00a0\u00a0x",
    "thin\u2009space\u202fnarrow\u3000ideographic", "zero\u200bwidth bom\ufeffhere soft\u00adhyphen",
    "\x00nul\x01\x1f\x7fdel", "x<|endoftext|>y", "<|endoftext|>", "<|endoftext|><|endoftext|> a",
    "\u0926\u093e\u0939 \u0966 \u096c\u0964", "\u0134A \u0134B", "word " * 300, "\u00e9" * 60,
]


def assert_same_ids(texts: list[str], vocabulary: list[str], merges: list[str]) -> list[np.ndarray]:
    ours = bpe.encode(texts, vocabulary, merges)
    theirs = bpe.keras_tokenizer(vocabulary, merges)(texts)
    differ = [texts[i][:40] for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a.tolist() != list(b)]
    assert not differ, f"{len(differ)} texts tokenized differently, e.g. {differ[:5]}"
    return ours


def split_as_gpt2(texts: list[str], vocabulary: list[str], merges: list[str]) -> list[list[int]]:
    tokenizer = bpe._tokenizer(vocabulary, merges)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]


def test_ids_equal_keras_hub_on_awkward_text():
    vocabulary, merges = bpe.train(CORPUS + AWKWARD, 600)
    ours = assert_same_ids(AWKWARD, vocabulary, merges)
    # The list tells splitting from not splitting: a keras-hub that started to split would fail above.
    assert [ids.tolist() for ids in ours] != split_as_gpt2(AWKWARD, vocabulary, merges)
    assert bpe.decode(ours, vocabulary, merges) == AWKWARD


@needs_clothing
def test_ids_equal_keras_hub_on_the_clothing_reviews():
    texts = [text.lower() for text in pd.read_parquet(CLOTHING)["text"][:3000]]
    vocabulary, merges = bpe.train(texts, 2000)
    assert len(vocabulary) == 2000
    ours = assert_same_ids(texts, vocabulary, merges)
    assert bpe.decode(ours, vocabulary, merges) == texts
    assert bpe.keras_tokenizer(vocabulary, merges).detokenize([ids.tolist() for ids in ours[:50]]) == texts[:50]


def test_every_byte_is_a_token_so_no_text_is_unknown():
    vocabulary, merges = bpe.train(["aaa bbb"] * 5, 300)  # a corpus of two letters
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(vocabulary[:bpe.BYTES])
    assert len(set(vocabulary)) == len(vocabulary) and vocabulary[-1] == bpe.END_OF_TEXT
    rng = np.random.default_rng(0)
    texts = [rng.integers(0, 256, 64, dtype=np.uint8).tobytes().decode("utf-8", "replace") for _ in range(200)]
    texts += ["".join(map(chr, rng.choice(np.r_[0:0xD800, 0xE000:0x110000], 32))) for _ in range(200)]
    ours = assert_same_ids(texts, vocabulary, merges)
    assert all(((ids >= 0) & (ids < len(vocabulary) - 1)).all() for ids in ours)  # no end-of-text either
    assert bpe.decode(ours, vocabulary, merges) == texts  # nothing dropped: every byte had a token


def test_end_of_text_is_the_last_id_and_one_token_in_the_text():
    vocabulary, merges = bpe.train(CORPUS + ["a <|endoftext|> b"] * 50, 400)
    end = len(vocabulary) - 1
    assert vocabulary[end] == bpe.END_OF_TEXT and vocabulary.count(bpe.END_OF_TEXT) == 1
    assert not any("endoftext" in merge.replace(" ", "") for merge in merges)  # not learned as text
    [ids] = assert_same_ids(["x<|endoftext|>y"], vocabulary, merges)
    assert ids.tolist().count(end) == 1 and len(ids) == 3


def test_a_vocabulary_smaller_than_the_bytes_is_one_line():
    with pytest.raises(ConfigError, match=r"^data.vocabulary_size: 256 is too small .* at least 257") as error:
        bpe.train(CORPUS, 256)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- task=causal_lm splits and the cache

DOCUMENTS = [f"review {i}: the dress {'fits' if i % 3 else 'runs small'}, caf\u00e9 \U0001F600\nsize {i % 7}"
             for i in range(60)]


def lm_config(tmp_path, *overrides):
    table = tmp_path / "reviews.jsonl"
    pd.DataFrame({"text": DOCUMENTS, "label": [i % 2 for i in range(60)]}).to_json(table, orient="records", lines=True)
    cfg = compose_config("data=table", f"data.path={table}", f"data.cache_dir={tmp_path / 'cache'}",
                         "data.vocabulary_size=300", "data.sequence_length=16", "task=causal_lm", "model=llama_tiny",
                         *overrides)
    validate(cfg)
    return cfg


def test_causal_lm_splits_are_bpe_windows_with_end_of_text_between_documents(tmp_path):
    cfg = lm_config(tmp_path)
    splits = data.load(cfg.data, cfg.task.name)
    assert splits.tokenizer == "bpe" and splits.vocabulary[-1] == bpe.END_OF_TEXT
    assert splits.end_of_text_id == len(splits.vocabulary) - 1 == splits.vocabulary_size - 1
    assert splits.x_train.shape[1] == 17 and splits.x_train.max() <= splits.end_of_text_id
    # The stream between end-of-text ids is whole documents, in order: decoded, each one of ours.
    stream = splits.x_train.ravel()
    ends = np.flatnonzero(stream == splits.end_of_text_id)
    assert len(ends) >= 3
    pieces = bpe.decode(np.split(stream, ends + 1)[1:-1], splits.vocabulary, splits.merges)
    assert all(piece.endswith(bpe.END_OF_TEXT) and piece[:-len(bpe.END_OF_TEXT)] in DOCUMENTS for piece in pieces)
    assert len(set(pieces)) == len(pieces)


def test_bpe_and_wordpiece_caches_never_mix_and_bpe_round_trips(tmp_path):
    cfg = lm_config(tmp_path)
    first = data.load(cfg.data, "causal_lm")
    classify = data.load(cfg.data, "classify")
    again = data.load(cfg.data, "causal_lm")
    entries = sorted((tmp_path / "cache" / "prepared").iterdir())
    assert len(entries) == 2
    files = {json.loads((entry / "meta.json").read_text())["tokenizer"]: {p.name for p in entry.iterdir()}
             for entry in entries}
    assert "merges.txt" in files["bpe"] and "merges.txt" not in files["wordpiece"]
    assert classify.tokenizer == "wordpiece" and classify.merges is None and classify.vocabulary[:2] == ["[PAD]", "[UNK]"]
    assert again.cache_hit and not first.cache_hit
    assert (again.vocabulary, again.merges, again.fingerprint) == (first.vocabulary, first.merges, first.fingerprint)
    np.testing.assert_array_equal(again.x_train, first.x_train)
    # The merges are part of the data's identity (the MLflow dataset digest).
    assert dataclasses.replace(first, merges=first.merges[:-1]).fingerprint != first.fingerprint


def test_cache_keys_differ_between_tokenizers(tmp_path):
    cfg = lm_config(tmp_path)
    source = ["reviews.jsonl", "0" * 64]
    keys = {(task, tokenizer): data.cache_key(cfg.data, task, source, tokenizer)
            for task in data.TOKENIZERS for tokenizer in ("wordpiece", "bpe")}
    assert len(set(keys.values())) == 4
    assert data.cache_key(cfg.data, "causal_lm", source) == keys["causal_lm", "bpe"]  # the default tokenizer
    assert data.cache_key(cfg.data, "classify", source) == keys["classify", "wordpiece"]

"""Training data is tokenized by the Rust `tokenizers` library, inference by keras-hub's
WordPieceTokenizer called eagerly (as serving.py does): both must give the same ids, or a served
model sees different tokens than it was trained on. For texts with words over 100 bytes both
sides are keras-hub's: those tests check that such texts are found."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from fp8exp.data import tokenize
from tests.conftest import CLOTHING, needs_clothing

CORPUS = ["the dress fits well, true to size!", "love the color; runs small... (ordered a 6)",
          "fabric is thin & itchy: returned it", "perfect for summer — 5 stars"] * 10

# Where the two could part: Unicode spaces keras-hub keeps inside words, control and format
# characters it drops, punctuation and CJK it isolates, words over 100 bytes it maps to [UNK].
AWKWARD = [
    "a\u00a0b c", "ideographic\u3000space", "line\u2028separator", "zero\u200bwidth", "bom\ufeffhere",
    "joiner\u200dx", "soft\u00adhyphen", "tab\tnew\nline\x0bvt\x85nel\x00nul\x7fdel",
    "中文字符 mixed日本 𠀀𠀁", "emoji 😀👍🏽 ok", "naïve café", "«quotes» — dash… ‘s’ ¿qué? ¡sí!",
    "$100 ^^ `x` ~y a_b 1,000.50 €", "", "   ", "##", "[UNK] [PAD]", "don't won’t",
    "a" * 100, "a" * 101, "é" * 50, "é" * 51, "ж" * 51 + " ok", "ж" * 30 + "-" + "ж" * 30,
    "😀" * 25, "😀" * 26, "x" * 99 + "é", "ж" * 60 + "\u00a0", "word " * 300,
]


def test_words_split_as_keras_hub_splits_them_for_every_code_point():
    from keras_hub.src.tokenizers.word_piece_tokenizer import pretokenize_python

    # Each code point between two letters: a separator, a word of its own, or part of the word.
    text = "".join(f"a{chr(c)}" for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    theirs = pretokenize_python(text, lowercase=False, strip_accents=False, split=True, split_on_cjk=True)
    ours = [word for word, _ in tokenize._pre_tokenizer().pre_tokenize_str(text)]
    first = next((i for i, pair in enumerate(itertools.zip_longest(ours, theirs)) if pair[0] != pair[1]), None)
    assert first is None, f"word {first}: ours {ours[first:first + 2]}, keras-hub's {theirs[first:first + 2]}"


def assert_same_ids(texts: list[str], vocabulary: list[str], sequence_length: int) -> None:
    ours = tokenize.encode(texts, vocabulary, sequence_length)
    theirs = np.asarray(tokenize.keras_tokenizer(vocabulary, sequence_length)(texts))
    differ = [texts[i][:40] for i in np.flatnonzero((ours != theirs).any(axis=1))]
    assert not differ, f"{len(differ)} texts tokenized differently, e.g. {differ[:5]}"


def test_ids_equal_keras_hub_on_awkward_text():
    vocabulary = tokenize.train_vocabulary(CORPUS + AWKWARD, 300)
    vocabulary += [t for t in ("ж", "##ж", "é", "##é", "😀", "##😀", "a", "##a", "x", "##x", "\u00a0", "##\u00a0")
                   if t not in vocabulary]  # so that long words tokenize unless the byte limit applies
    assert_same_ids(AWKWARD, vocabulary, 40)


@needs_clothing
def test_ids_equal_keras_hub_on_the_clothing_reviews():
    texts = [text.lower() for text in pd.read_parquet(CLOTHING)["text"]]
    assert_same_ids(texts, tokenize.train_vocabulary(texts, 20000), 200)


def test_vocabulary_is_trained_on_words_split_as_keras_hub_splits():
    vocabulary = tokenize.train_vocabulary(["a\u00a0b, c.d"] * 5, 100)
    assert vocabulary[:2] == tokenize.RESERVED
    assert {"a\u00a0b", ",", ".", "c", "d"} <= set(vocabulary)
    assert not {"b,", "c.", "c.d", "##,"} & set(vocabulary)


def test_ids_are_truncated_and_padded():
    vocabulary = tokenize.train_vocabulary(CORPUS, 200)
    texts = ["the dress", "the dress fits well, true to size!"]
    full = tokenize.encode(texts, vocabulary, 12)
    assert full.dtype == np.int32 and (full[0, :2] > 1).all() and (full[0, 2:] == 0).all() and (full[1, :8] != 0).all()
    for length in (1, 8):
        np.testing.assert_array_equal(tokenize.encode(texts, vocabulary, length), full[:, :length])

"""Text to token ids: the ids keras-hub's WordPieceTokenizer gives, in a fraction of the time.

The WordPiece vocabulary and the token ids of the prepared splits both come from the Rust
`tokenizers` library, set up to split words exactly as keras-hub's WordPieceTokenizer does
(`lowercase=False, strip_accents=False, split_on_cjk=True`). That is what brings raw text to
batches >10x faster than the reference example's way (docs/benchmarks.md): its vocabulary trainer
takes ~30 s where this one takes ~1 s. Inference (serving.py) calls keras-hub's tokenizer eagerly
with the same vocabulary, which runs keras-hub's pure-Python path (keras-hub >= 0.32; inside
tf.data it would take a TensorFlow path that differs on rare characters): tests/test_tokenize.py
checks the ids agree. The one rule the Rust side cannot express, keras-hub's limit of 100 *bytes*
(not characters) per word, is kept by handing the rare texts it could affect to keras-hub."""

from __future__ import annotations

import functools
import re

import numpy as np

RESERVED = ["[PAD]", "[UNK]"]  # ids 0 and 1: padding and out-of-vocabulary, as in the example

# keras-hub's word splitting (its Python path, which inference takes): ASCII whitespace and control
# and format characters separate words and are dropped; ASCII symbols, Unicode punctuation and CJK
# ideographs are words of their own. A no-break space is part of a word. In `regex` syntax:
SEPARATOR = r" \t\n\r\f\p{Cc}\p{Cf}"
SINGLE = (r"!-/:-@\[-`{-~\p{P}\u4E00-\u9FFF\u3400-\u4DBF\U00020000-\U0002A6DF\U0002A700-\U0002B73F"
          r"\U0002B740-\U0002B81F\U0002B820-\U0002CEAF\uF900-\uFAFF\U0002F800-\U0002FA1F")
MAX_WORD_BYTES = 100  # keras-hub maps longer words to [UNK]
# A word over 100 bytes but within 100 characters has a non-ASCII character and at least 26
# characters (4 bytes at most each), with no ASCII separator or symbol in between.
_MAYBE_LONG_WORD = re.compile(r"[^\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]{26,}")


@functools.cache
def _word_pattern() -> str:
    """A word or a single character, for the Rust side (Oniguruma), with both classes spelled out
    as the code points the `regex` module (keras-hub's) puts in them: Oniguruma's Unicode tables
    are older (U+2E60..U+2E63 are not punctuation to it). One pass, ~45 ms."""
    import regex

    every_code_point = np.arange(0x110000, dtype="<u4").tobytes().decode("utf-32-le", "surrogatepass")

    def ranges(members: str) -> str:
        spans = ((m.start(), m.end() - 1) for m in regex.finditer(f"[{members}]+", every_code_point))
        return "".join(f"\\x{{{a:X}}}" + (f"-\\x{{{b:X}}}" if b > a else "") for a, b in spans)

    separator, single = ranges(SEPARATOR), ranges(SINGLE)
    return f"[^{separator}{single}]+|[{single}]"


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(_word_pattern()), behavior="removed", invert=True)  # keep the matches


def train_vocabulary(texts: list[str], vocabulary_size: int) -> list[str]:
    """WordPiece vocabulary (## marks word continuations), reserved tokens first."""
    from tokenizers import Tokenizer, models, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocabulary_size, special_tokens=RESERVED,
                                        continuing_subword_prefix="##", show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    vocabulary = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    assert vocabulary[:2] == RESERVED, vocabulary[:2]
    return vocabulary


def keras_tokenizer(vocabulary: list[str], sequence_length: int):
    """keras-hub's tokenizer with the settings serving.py gives it (serving.py stands alone, without
    fp8exp): the reference `encode` must agree with."""
    import keras_hub

    return keras_hub.tokenizers.WordPieceTokenizer(
        vocabulary=vocabulary, sequence_length=sequence_length, lowercase=False, oov_token="[UNK]")


def encode(texts: list[str], vocabulary: list[str], sequence_length: int) -> np.ndarray:
    """Token ids, truncated and padded with [PAD] to `sequence_length`."""
    from tokenizers import Tokenizer, models

    # Rust counts characters, keras-hub bytes: equal for ASCII words; the rest are handed over below.
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocabulary)}, unk_token="[UNK]",
                                           max_input_chars_per_word=MAX_WORD_BYTES))
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.enable_truncation(sequence_length)
    ids = np.zeros((len(texts), sequence_length), np.int32)  # [PAD] is 0
    for row, encoding in enumerate(tokenizer.encode_batch_fast(texts, add_special_tokens=False)):
        ids[row, :len(encoding.ids)] = encoding.ids
    long_word = [i for i, text in enumerate(texts) if not text.isascii() and _has_long_word(text)]
    if long_word:
        ids[long_word] = np.asarray(keras_tokenizer(vocabulary, sequence_length)([texts[i] for i in long_word]))
    return ids


def _has_long_word(text: str) -> bool:
    return any(not run.isascii() and len(run.encode()) > MAX_WORD_BYTES for run in _MAYBE_LONG_WORD.findall(text))

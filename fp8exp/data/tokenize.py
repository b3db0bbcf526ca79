"""Text to token ids: the ids keras-hub's WordPieceTokenizer gives, in a fraction of the time.

The WordPiece vocabulary and the token ids of the prepared splits both come from the Rust
`tokenizers` library, set up to split words exactly as keras-hub's WordPieceTokenizer does
(`lowercase=False, strip_accents=False, split_on_cjk=True`). That is what brings raw text to
batches >10x faster than the reference example's way (docs/benchmarks.md): its vocabulary trainer
takes ~30 s where this one takes ~1 s. Inference (serving.py) tokenizes with keras-hub's
tokenizer and the same vocabulary; tests/test_tokenize.py checks both give the same ids. The one
rule the Rust side cannot express, keras-hub's limit of 100 *bytes* (not characters) per word,
is kept by handing the rare texts it could affect to keras-hub."""

from __future__ import annotations

import re

import numpy as np

RESERVED = ["[PAD]", "[UNK]"]  # ids 0 and 1: padding and out-of-vocabulary, as in the example

# keras-hub's word splitting (keras_hub/src/tokenizers/word_piece_tokenizer.py): ASCII whitespace
# (RE2's \s) and control/format characters separate words and are dropped; ASCII symbols, Unicode
# punctuation and CJK ideographs are words of their own. A no-break space is part of a word.
_SEPARATOR = r" \t\n\r\f\p{Cc}\p{Cf}"
_SINGLE = (r"!-/:-@\[-`{-~\p{P}\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}"
           r"\x{2B740}-\x{2B81F}\x{2B820}-\x{2CEAF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}")
_WORD = rf"[^{_SEPARATOR}{_SINGLE}]+|[{_SINGLE}]"  # matched in one pass: twice as fast as two splits
MAX_WORD_BYTES = 100  # keras-hub (tf-text's FastWordpieceTokenizer) maps longer words to [UNK]
# A word over 100 bytes but within 100 characters has a non-ASCII character and at least 26
# characters (4 bytes at most each), with no ASCII separator or symbol in between.
_MAYBE_LONG_WORD = re.compile(r"[^\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]{26,}")


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(_WORD), behavior="removed", invert=True)  # keep the matches


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
    """The tokenizer inference uses: keras-hub's, as in the reference example."""
    import keras_hub

    return keras_hub.tokenizers.WordPieceTokenizer(
        vocabulary=vocabulary, sequence_length=sequence_length, lowercase=False, oov_token="[UNK]")


def encode(texts: list[str], vocabulary: list[str], sequence_length: int) -> np.ndarray:
    """Token ids, truncated and padded with [PAD] to `sequence_length`."""
    from tokenizers import Tokenizer, models

    if not texts:
        return np.zeros((0, sequence_length), np.int32)
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

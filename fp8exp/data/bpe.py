"""Text to token ids for language models (task=causal_lm): a byte-level BPE, the ids keras-hub's
BytePairTokenizer gives.

Byte-level, as GPT-2: every text is UTF-8 bytes, and all 256 are tokens, so no text is ever unknown
(WordPiece maps unseen characters to [UNK], which a language model cannot write back). The
vocabulary and merges are trained with the Rust `tokenizers` library on words split as GPT-2 splits
them, so merges are learned within words; the end-of-text token is the last id, as in GPT-2.

Inference calls keras-hub's BytePairTokenizer eagerly (`keras_tokenizer`). keras-hub 0.32 runs it
with `tokenizers` too, but hands its split regex over as a plain string, which `tokenizers` matches
literally: eager keras-hub never splits, and applies the merges to the whole text. `encode` does
exactly that, so training and inference ids agree (tests/test_bpe.py checks it, on the shared
corpus and on awkward Unicode). Splitting as GPT-2 at encode time would differ on ~6% of the shared
corpus: a merge learned within words can also join the end of one word to the start of the next
(`\r` `\n` in "ok\r\nnext", `'` `s` in "('sand"). Inside tf.data keras-hub takes its TensorFlow path,
which splits: call it eagerly."""

from __future__ import annotations

import json

import numpy as np

from fp8exp.config import ConfigError

END_OF_TEXT = "<|endoftext|>"
"""Joins packed documents; the last id. Special on both sides: the literal text maps to its id."""
BYTES = 256
MIN_VOCABULARY = BYTES + 1  # every byte, and END_OF_TEXT


def train(texts: list[str], vocabulary_size: int) -> tuple[list[str], list[str]]:
    """Vocabulary (tokens by id: the 256 bytes, merged tokens, END_OF_TEXT last) and merges ("a b",
    in rank order), at most `vocabulary_size` tokens (fewer when the text runs out of pairs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if vocabulary_size < MIN_VOCABULARY:
        raise ConfigError("data.vocabulary_size", f"{vocabulary_size} is too small for the byte-level BPE of "
                          f"task=causal_lm: it needs at least {MIN_VOCABULARY} (256 bytes and {END_OF_TEXT})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's words
    trainer = trainers.BpeTrainer(vocab_size=vocabulary_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # The trainer would learn merges from a literal END_OF_TEXT; encoding cuts the text around it.
    tokenizer.train_from_iterator((piece for text in texts for piece in text.split(END_OF_TEXT)), trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    by_id = sorted(model["vocab"], key=model["vocab"].get)
    vocabulary = [token for token in by_id if token != END_OF_TEXT] + [END_OF_TEXT]
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    return vocabulary, merges


def _tokenizer(vocabulary: list[str], merges: list[str]):
    """The Rust tokenizer set up as keras-hub 0.32's eager BytePairTokenizer is: no split, bytes
    mapped to GPT-2's printable characters, END_OF_TEXT special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE({token: i for i, token in enumerate(vocabulary)},
                                     [tuple(merge.split(" ")) for merge in merges]))
    tokenizer.add_special_tokens([END_OF_TEXT])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def encode(texts: list[str], vocabulary: list[str], merges: list[str]) -> list[np.ndarray]:
    """Each text's token ids in full, neither truncated nor padded (for packing)."""
    encodings = _tokenizer(vocabulary, merges).encode_batch_fast(texts, add_special_tokens=False)
    return [np.asarray(encoding.ids, np.int32) for encoding in encodings]


def decode(ids: list[list[int]] | np.ndarray, vocabulary: list[str], merges: list[str]) -> list[str]:
    """Texts of token-id sequences (END_OF_TEXT written out as itself)."""
    return _tokenizer(vocabulary, merges).decode_batch([list(map(int, row)) for row in ids],
                                                       skip_special_tokens=False)


def keras_tokenizer(vocabulary: list[str], merges: list[str], sequence_length: int | None = None):
    """keras-hub's tokenizer with the settings inference must use, the reference `encode` agrees
    with. Call it eagerly; with `sequence_length` keras-hub pads with id 0 (a byte), so keep its
    padding mask."""
    import keras_hub

    return keras_hub.tokenizers.BytePairTokenizer(
        vocabulary={token: i for i, token in enumerate(vocabulary)}, merges=list(merges),
        sequence_length=sequence_length, add_prefix_space=False, unsplittable_tokens=[END_OF_TEXT])

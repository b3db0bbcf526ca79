"""Texts to token ids and back, exactly as the run's data were tokenized: keras-hub's own
WordPieceTokenizer (task=classify) or BytePairTokenizer (task=causal_lm), rebuilt from the saved
vocabulary (and merges) with the settings fp8exp/data/tokenize.py and bpe.py train with, called
eagerly. A run on synthetic data has no tokenizer: its texts are token ids written out ("5 17 33")."""

from __future__ import annotations

import numpy as np

from .files import InputError, check_texts


class Tokens:
    def __init__(self, meta: dict, files: dict[str, list[str]]):
        self.meta = meta
        self.vocabulary = files.get("vocabulary")
        self.merges = files.get("merges")
        self._tokenizer = None

    @property
    def takes_token_ids(self) -> bool:
        return self.meta["input"] == "token_ids"

    def tokenizer(self):
        """keras-hub's tokenizer for this model (built once)."""
        if self._tokenizer is None:
            import keras_hub

            if self.meta["tokenizer"] == "bpe":
                self._tokenizer = keras_hub.tokenizers.BytePairTokenizer(
                    vocabulary={token: i for i, token in enumerate(self.vocabulary)}, merges=list(self.merges),
                    add_prefix_space=False, unsplittable_tokens=self.meta.get("special_tokens") or None)
            else:
                self._tokenizer = keras_hub.tokenizers.WordPieceTokenizer(
                    vocabulary=self.vocabulary, lowercase=False, oov_token="[UNK]")
        return self._tokenizer

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's ids in full (neither padded nor truncated); InputError for what is no text."""
        check_texts(texts)
        if self.takes_token_ids:
            return [self._parse_ids(text) for text in texts]
        if self.meta["lowercase"]:
            texts = [text.lower() for text in texts]
        return [np.asarray(ids, np.int32) for ids in self.tokenizer()(texts)]

    def padded(self, texts: list[str], length: int) -> tuple[np.ndarray, int]:
        """(ids cut or padded with PAD to `length`, as classification data were; how many were cut)."""
        rows = self.encode(texts)
        ids = np.zeros((len(rows), length), np.int32)  # PAD is 0
        for row, tokens in enumerate(rows):
            ids[row, :min(len(tokens), length)] = tokens[:length]
        return ids, sum(len(tokens) > length for tokens in rows)

    def decode(self, ids, after=()) -> str:
        """The text of `ids`, which follow the ids `after`: BPE writes the tokens' bytes; WordPiece
        joins its tokens with spaces, so the text is what `ids` add to `after` ("##" pieces glue on)."""
        ids = [int(i) for i in ids]
        if self.takes_token_ids:
            return " ".join(map(str, ids))
        tokenizer = self.tokenizer()
        if self.meta["tokenizer"] == "bpe" or not after or not ids:
            return tokenizer.detokenize([ids])[0] if ids else ""
        before = [int(after[-1])]
        whole, start = tokenizer.detokenize([before + ids, before])
        return whole[len(start):] if whole.startswith(start) else tokenizer.detokenize([ids])[0]

    def _parse_ids(self, text: str) -> np.ndarray:
        limit = self.meta["vocabulary_size"]
        try:
            tokens = [int(token) for token in text.split()]
        except ValueError:
            raise InputError(f"this model was trained on synthetic data and has no tokenizer: give token ids "
                             f"separated by spaces (e.g. '5 17 33'), not {text[:40]!r}") from None
        if any(not 0 <= token < limit for token in tokens):
            raise InputError(f"token ids must be in [0, {limit}); got {text[:40]!r}")
        return np.asarray(tokens, np.int32)

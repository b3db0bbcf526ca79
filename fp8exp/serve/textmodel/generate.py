"""A saved language model (task=causal_lm): prompts in, continuations out, through keras-hub's
`CausalLM.generate` on token ids (the model has no preprocessor: it gets {"token_ids",
"padding_mask"} arrays padded to prompt + max_new_tokens and stops at the end-of-text id).

Every prompt starts a document: the end-of-text id goes first, as packing put it before each
document in training. A prompt too long to leave room for max_new_tokens within the model's
maximum length keeps its last tokens (a training window starts mid-document too). The
continuation is the text of the new tokens before the first end of text. Sampling: `greedy` (the
most likely token; deterministic) or `top_k` (keras_hub.samplers.TopKSampler: one of the k most
likely, by their probabilities; the same seed and request give the same text). Inference only:
generation runs the model with training=False and never writes its variables, so FP8 scales and
amax histories stay as trained."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np

from .files import InputError
from .tokens import Tokens

SAMPLERS = ("greedy", "top_k")
SEEDS = 2**32
BATCH = 64
DEFAULT_NEW_TOKENS = 32
MAX_SAMPLERS = 4  # compiled generate programs kept (one per sampler and top_k)
"""Prompts per generate call."""


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int | None = None
    """None = DEFAULT_NEW_TOKENS, or fewer when the model's maximum length leaves less room."""
    sampler: str = "greedy"
    top_k: int = 5
    """top_k only: how many of the most likely tokens to sample from."""
    seed: int | None = None
    """top_k only: None = a new random seed per request."""


@dataclass
class Generation:
    texts: list[str]
    """Each prompt's continuation."""
    token_ids: list[np.ndarray]
    """Its new token ids (without the end of text)."""
    ended: list[bool]
    """Whether it stopped at the end-of-text token (else it ran to max_new_tokens)."""
    truncated: int
    """Prompts cut to their last tokens to fit the model's maximum length."""


def whole(key: str, value, low: int, high: int, why: str = ""):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise InputError(f"{key}: got {value!r}; valid: a whole number from {low} to {high}{why}")
    return int(value)


def check_settings(meta: dict, max_new_tokens: int = Settings.max_new_tokens, sampler: str = Settings.sampler,
                   top_k: int = Settings.top_k, seed: int | None = Settings.seed) -> Settings:
    """Generation settings checked against a language model's metadata (before Keras loads it);
    InputError naming the setting and what is valid."""
    if sampler not in SAMPLERS:
        raise InputError(f"sampler: got {sampler!r}; valid: {', '.join(SAMPLERS)}")
    longest = meta["max_length"]
    if max_new_tokens is None:
        max_new_tokens = min(DEFAULT_NEW_TOKENS, longest - 1)
    return Settings(
        whole("max_new_tokens", max_new_tokens, 1, longest - 1,
              f" (the model's maximum length {longest}, prompt included, less one prompt token)"),
        sampler, whole("top_k", top_k, 1, meta["vocabulary_size"], " (the vocabulary size)"),
        None if seed is None else whole("seed", seed, 0, SEEDS - 1))


class TextGenerator:
    def __init__(self, model, meta: dict, files: dict[str, list[str]] | None = None):
        self.model = model
        self.meta = meta
        self.tokens = Tokens(meta, files or {})
        self._samplers: dict[tuple, tuple] = {}

    @property
    def max_length(self) -> int:
        """The most tokens, prompt and continuation together, the model runs on."""
        return self.meta["max_length"]

    @property
    def end_of_text_id(self) -> int:
        return self.meta["end_of_text_id"]

    def settings(self, **given) -> Settings:
        """Settings (defaults for what is not given) checked against this model; see check_settings."""
        return check_settings(self.meta, **given)

    def prompts(self, texts: list[str], max_new_tokens: int) -> tuple[list[np.ndarray], int]:
        """(each text's ids after the end-of-text id, cut to leave room for max_new_tokens; how many were cut)."""
        room = self.max_length - max_new_tokens
        rows = [np.concatenate([[self.end_of_text_id], ids]).astype(np.int32) for ids in self.tokens.encode(texts)]
        return [row[-room:] for row in rows], sum(len(row) > room for row in rows)

    def generate(self, texts: list[str], settings: Settings | None = None) -> Generation:
        settings = self.settings(**asdict(settings or Settings()))
        prompts, truncated = self.prompts(texts, settings.max_new_tokens)
        self._use_sampler(settings)
        new, ended = [], []
        for start in range(0, len(prompts), BATCH):
            batch = prompts[start:start + BATCH]
            # Padded up to a power of two (within max_length): a handful of compiled programs serve
            # every prompt length, at most twice the positions needed.
            needed = max(map(len, batch)) + settings.max_new_tokens
            length = min(self.max_length, 1 << (needed - 1).bit_length())
            token_ids = np.zeros((len(batch), length), np.int32)
            padding_mask = np.zeros((len(batch), length), bool)
            for row, prompt in enumerate(batch):
                token_ids[row, :len(prompt)], padding_mask[row, :len(prompt)] = prompt, True
            out = self.model.generate({"token_ids": token_ids, "padding_mask": padding_mask},
                                      stop_token_ids=(self.end_of_text_id,))
            out = np.asarray(out["token_ids"])
            for row, prompt in enumerate(batch):
                ids = out[row, len(prompt):len(prompt) + settings.max_new_tokens]
                stops = np.flatnonzero(ids == self.end_of_text_id)
                ended.append(bool(stops.size))
                new.append(ids[:stops[0]] if stops.size else ids)
        return Generation([self.tokens.decode(ids, after=prompt) for ids, prompt in zip(new, prompts)], new,
                          ended, truncated)

    def _use_sampler(self, settings: Settings) -> None:
        """keras-hub's way to choose a sampler is compile(sampler=...), which drops the compiled
        generate function; each sampler keeps its own, so switching back compiles nothing again.
        A top_k sampler's random state starts from the seed, as TopKSampler(seed=...) does."""
        import keras_hub

        key = (settings.sampler, settings.top_k if settings.sampler == "top_k" else None)
        if key not in self._samplers:
            if len(self._samplers) >= MAX_SAMPLERS:  # each holds a compiled program: keep the latest few
                self._samplers.pop(next(iter(self._samplers)))
            sampler = keras_hub.samplers.TopKSampler(k=settings.top_k) if key[1] else keras_hub.samplers.GreedySampler()
            self.model.compile(sampler=sampler)
            self._samplers[key] = (self.model.sampler, self.model.make_generate_function())
        self.model.sampler, self.model.generate_function = self._samplers[key]
        if key[1]:
            seed = random.SystemRandom().randrange(SEEDS) if settings.seed is None else settings.seed
            state = self.model.sampler.seed_generator.state
            state.assign(np.asarray([seed, 0], dtype=state.dtype))

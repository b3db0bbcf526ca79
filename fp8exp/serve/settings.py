"""The `key=value` command lines of `python -m fp8exp.predict` and `python -m fp8exp.infer_bench`,
and the store they read: one clear line for anything a user can fix."""

from __future__ import annotations

import math
import os
from pathlib import Path

# Other spellings of a key: the one these commands used before they took the runner's.
ALIASES = {"tracking_uri": "tracking.uri"}


class UsageError(Exception):
    """A problem the user can fix; printed as one line, exit 2."""


def parse_settings(argv: list[str], keys: tuple[str, ...], repeatable: tuple[str, ...]) -> dict[str, list[str]]:
    """`key=value` words -> {key: [values]}; unknown keys and missing `=` are errors."""
    settings: dict[str, list[str]] = {}
    for word in argv:
        key, sep, value = word.partition("=")
        key = key.strip().lstrip("-")
        key = ALIASES.get(key, key)
        if not sep:
            raise UsageError(f"expected key=value, got {word!r}; valid keys: {', '.join(keys)}")
        if key not in keys:
            raise UsageError(f"unknown setting {key!r}; valid keys: {', '.join(keys)}")
        if key in settings and key not in repeatable:
            raise UsageError(f"{key} given twice")
        settings.setdefault(key, []).append(value)
    return settings


def store_uri(tracking_uri: str | None) -> str:
    uri = tracking_uri or f"sqlite:///{os.path.join(os.getcwd(), 'mlflow.db')}"
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise UsageError(f"no MLflow store at {uri}; run from the directory you trained in, or pass tracking.uri=")
    return uri


def number(key: str, text: str, kind=int, minimum=1):
    try:
        value = kind(text)
    except ValueError:
        raise UsageError(f"{key}: got {text!r}, expected a number") from None
    if not value >= minimum or (kind is float and not math.isfinite(value)):
        raise UsageError(f"{key}: got {text}, expected at least {minimum}")
    return value

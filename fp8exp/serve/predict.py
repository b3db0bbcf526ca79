"""`python -m fp8exp.predict run_id=RUN_ID text="..."`: classify texts with the model a run saved,
or continue them with a language model (task=causal_lm).

    python -m fp8exp.predict run_id=0c5e... text="a wonderful film"
    python -m fp8exp.predict model_id=m-4f1a... text="a wonderful film"  # a LoggedModel (Models tab)
    python -m fp8exp.predict run_id=0c5e... file=reviews.txt          # one text per line
    cat reviews.txt | python -m fp8exp.predict run_id=0c5e...         # stdin (or file=-)
    python -m fp8exp.predict run_id=0c5e... file=a.txt file=- format=jsonl
    python -m fp8exp.predict run_id=LM_RUN text="the dress is" max_new_tokens=20 sampler=top_k top_k=10 seed=1

A classifier prints one line per input: label, probability of that label and the text
(tab-separated), or JSON lines with every class's probability (format=jsonl). Inputs longer than
the model's sequence length are truncated, and a note says how many.

A language model prints one line per input: the continuation (tabs, newlines and backslashes
written \\t, \\n, \\\\) and the text, tab-separated; or JSON lines with the continuation as
it is, its new tokens and whether it reached the end-of-text token (format=jsonl). Each text is
read as the start of a document; one too long to leave room for max_new_tokens keeps its last
tokens, and a note says so. The MLflow pyfunc model generates the same (greedy: the same text).

The model runs in inference mode (training=False): FP8 scales stay as trained, nothing is
calibrated. A run on synthetic data has no tokenizer: give token ids separated by spaces
("5 17 33"); a language model's continuation is token ids too.

Settings (key=value):
  run_id        the MLflow run whose model to use (printed at the end of every run): its LoggedModel
                `model`, or its artifact `model/` (runs saved offline, or before fp8exp logged models)
  model_id      or the model itself: a LoggedModel's id (`models:/<model_id>`, the Models tab)
  text          a text to classify or continue (repeatable)
  file          a file with one text per line, `-` for stdin (repeatable); blank lines are skipped
  tracking.uri  the MLflow store, the runner's key (default: sqlite:///<current dir>/mlflow.db, as
                fp8exp uses; `tracking_uri` is accepted too)
  format        tsv (default) | jsonl
Language models only:
  max_new_tokens  tokens to generate at most (default 32, or fewer to fit the trained window); it stops earlier at the end-of-text token
  sampler         greedy (default: the most likely token) | top_k (one of the top_k most likely)
  top_k           sampler=top_k: how many tokens to sample from (default 5)
  seed            sampler=top_k: the random seed (a whole number; default: a new one each call)
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fp8exp.serve.locate import check_files, load_directory, model_dir
from fp8exp.serve.settings import UsageError, number, parse_settings

PROG = "fp8exp.predict"
GENERATION = ("max_new_tokens", "sampler", "top_k", "seed")
KEYS = ("run_id", "model_id", "text", "file", "tracking.uri", "format", *GENERATION)
REPEATABLE = ("text", "file")
FORMATS = ("tsv", "jsonl")
ECHO_CHARS = 60


@dataclass
class Args:
    run_id: str = ""
    model_id: str = ""
    texts: list[str] = field(default_factory=list)
    tracking_uri: str | None = None
    format: str = "tsv"
    generation: dict = field(default_factory=dict)
    """The generation settings given (language models only), parsed."""


def read_lines(name: str, stdin) -> list[str]:
    """One text per "\n"-ended line, a trailing "\r" dropped, from a file and stdin alike: not
    splitlines(), which also breaks at U+2028, U+0085 and form feeds, nor sys.stdin's universal
    newlines, which break at a lone "\r": its bytes are decoded instead, as UTF-8 like a file's."""
    if name == "-":
        buffer = getattr(stdin, "buffer", None)
        text = buffer.read().decode("utf-8", errors="replace") if buffer else stdin.read()
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise UsageError(f"file: {name} does not exist" if not path.exists() else f"file: {name} is not a file")
        text = path.read_bytes().decode("utf-8", errors="replace")
    return [line.removesuffix("\r") for line in text.split("\n")]


def parse_args(argv: list[str], stdin=None) -> Args:
    """Everything checkable without Keras or MLflow, including reading the input."""
    stdin = sys.stdin if stdin is None else stdin
    settings = parse_settings(argv, KEYS, REPEATABLE)
    args = Args()
    run_id = settings.get("run_id", [""])[0].strip()
    model_id = settings.get("model_id", [""])[0].strip()
    if run_id and model_id:
        raise UsageError("give run_id=... or model_id=..., not both")
    if not run_id and not model_id:
        raise UsageError("run_id is required: the MLflow run whose model to use (fp8exp prints it after each run), "
                         "or model_id=: its LoggedModel's id")
    args.run_id, args.model_id = run_id, model_id
    args.tracking_uri = settings.get("tracking.uri", [None])[0] or None
    args.format = settings.get("format", ["tsv"])[0]
    if args.format not in FORMATS:
        raise UsageError(f"format: got {args.format!r}; valid: {', '.join(FORMATS)}")

    args.generation = parse_generation(settings)
    for text in settings.get("text", []):
        if not text.strip():
            raise UsageError("text is empty; give the text to classify or continue, e.g. text=\"a wonderful film\"")
        args.texts.append(text)
    files = settings.get("file", [])
    if not settings.get("text") and not files:
        if stdin is None or stdin.isatty():
            raise UsageError('nothing to classify: give text="...", file=PATH (one text per line), or pipe texts on stdin')
        files = ["-"]
    for name in files:
        lines = [line for line in read_lines(name, stdin) if line.strip()]
        if not lines:
            raise UsageError(f"{'stdin' if name == '-' else 'file: ' + name} has no text to classify (empty)")
        args.texts.extend(lines)
    return args


def parse_generation(settings: dict[str, list[str]]) -> dict:
    """The generation settings given, as values (what the model allows is checked once it is known)."""
    from fp8exp.serve.textmodel import SAMPLERS  # (NumPy, not Keras)

    given = {key: settings[key][0].strip() for key in GENERATION if key in settings}
    if given.get("sampler", SAMPLERS[0]) not in SAMPLERS:
        raise UsageError(f"sampler: got {given['sampler']!r}; valid: {', '.join(SAMPLERS)}")
    for key in ("top_k", "seed"):
        if key in given and given.get("sampler") != "top_k":
            raise UsageError(f"{key}: only with sampler=top_k (sampler=greedy always takes the most likely token)")
    for key, minimum in (("max_new_tokens", 1), ("top_k", 1), ("seed", 0)):
        if key in given:
            given[key] = number(key, given[key], int, minimum)
    return given


def check_generation(meta: dict, args: Args, name: str):
    """The checked generation settings for a language model, None for a classifier (which takes none)."""
    from fp8exp.serve import textmodel

    if meta["task"] != "causal_lm":
        if args.generation:
            raise UsageError(f"{next(iter(args.generation))}: {name} is a classifier (task={meta['task']}); "
                             f"{', '.join(GENERATION)} are for language models (task=causal_lm)")
        return None
    try:
        return textmodel.check_settings(meta, **args.generation)
    except textmodel.InputError as error:
        raise UsageError(str(error)) from None


# ---------------------------------------------------------------- output


def one_line(text: str, limit: int = ECHO_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def write(predictions, texts: list[str], class_names: list[str], fmt: str, out) -> None:
    for index, text in enumerate(texts):
        label, probability = predictions.labels[index], float(predictions.probability[index])
        if fmt == "jsonl":
            every = {name: round(float(p), 6) for name, p in zip(class_names, predictions.probabilities[index])}
            out.write(json.dumps({"text": text, "label": label, "probability": round(probability, 6),
                                  "probabilities": every}) + "\n")
        else:
            out.write(f"{label}\t{probability:.4f}\t{one_line(text)}\n")


def escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def write_generated(generation, texts: list[str], fmt: str, out) -> None:
    for text, generated, ids, ended in zip(texts, generation.texts, generation.token_ids, generation.ended):
        if fmt == "jsonl":
            out.write(json.dumps({"text": text, "generated": generated, "new_tokens": len(ids),
                                  "end_of_text": ended}) + "\n")
        else:
            out.write(f"{escape(generated)}\t{one_line(text)}\n")


def main(argv: list[str] | None = None, stdin=None, out=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = out or sys.stdout
    if any(word in ("-h", "--help", "help") for word in argv):
        print(__doc__.strip())
        return 0
    try:
        args = parse_args(argv, stdin)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="fp8exp-predict-") as scratch:
            directory, name = model_dir(args.run_id or None, args.tracking_uri, Path(scratch), args.model_id or None)
            generation = check_generation(check_files(directory, name), args, name)
            model = load_directory(directory, name)
            from fp8exp.serve.textmodel import InputError

            try:
                result = model.generate(args.texts, generation) if generation else model.classify(args.texts)
            except InputError as error:
                raise UsageError(str(error)) from None
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    if generation:
        write_generated(result, args.texts, args.format, out)
        if result.truncated:
            print(f"{PROG}: note: {result.truncated} of {len(args.texts)} texts were longer than the model's "
                  f"{model.max_length} tokens less max_new_tokens={generation.max_new_tokens} and kept their last "
                  f"{model.max_length - generation.max_new_tokens}", file=sys.stderr)
        return 0
    write(result, args.texts, model.class_names, args.format, out)
    if result.truncated:
        print(f"{PROG}: note: {result.truncated} of {len(args.texts)} inputs were longer than the model's "
              f"{model.sequence_length} tokens and were truncated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

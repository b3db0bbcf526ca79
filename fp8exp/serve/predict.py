"""`python -m fp8exp.predict run_id=RUN_ID text="..."`: classify texts with the model a run saved.

    python -m fp8exp.predict run_id=0c5e... text="a wonderful film"
    python -m fp8exp.predict model_id=m-4f1a... text="a wonderful film"  # a LoggedModel (Models tab)
    python -m fp8exp.predict run_id=0c5e... file=reviews.txt          # one text per line
    cat reviews.txt | python -m fp8exp.predict run_id=0c5e...         # stdin (or file=-)
    python -m fp8exp.predict run_id=0c5e... file=a.txt file=- format=jsonl

Prints one line per input: label, probability of that label and the text (tab-separated), or
JSON lines with every class's probability (format=jsonl). The model runs in inference mode
(training=False): FP8 scales stay as trained, nothing is calibrated. Inputs longer than the
model's sequence length are truncated, and a note says how many. A run on synthetic data has
no tokenizer: give token ids separated by spaces ("5 17 33").

Settings (key=value):
  run_id        the MLflow run whose model to use (printed at the end of every run): its LoggedModel
                `model`, or its artifact `model/` (runs saved offline, or before fp8exp logged models)
  model_id      or the model itself: a LoggedModel's id (`models:/<model_id>`, the Models tab)
  text          a text to classify (repeatable)
  file          a file with one text per line, `-` for stdin (repeatable); blank lines are skipped
  tracking.uri  the MLflow store, the runner's key (default: sqlite:///<current dir>/mlflow.db, as
                fp8exp uses; `tracking_uri` is accepted too)
  format        tsv (default) | jsonl
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fp8exp.serve.locate import load
from fp8exp.serve.settings import UsageError, parse_settings

PROG = "fp8exp.predict"
KEYS = ("run_id", "model_id", "text", "file", "tracking.uri", "format")
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

    for text in settings.get("text", []):
        if not text.strip():
            raise UsageError("text is empty; give the text to classify, e.g. text=\"a wonderful film\"")
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


# ---------------------------------------------------------------- the run's model


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
            classifier, name = load(args.run_id or None, args.tracking_uri, Path(scratch), args.model_id or None)
            from fp8exp.serve.pyfunc import InputError

            try:
                predictions = classifier.classify(args.texts)
            except InputError as error:
                raise UsageError(str(error)) from None
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    write(predictions, args.texts, classifier.class_names, args.format, out)
    if predictions.truncated:
        print(f"{PROG}: note: {predictions.truncated} of {len(args.texts)} inputs were longer than the model's "
              f"{classifier.sequence_length} tokens and were truncated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

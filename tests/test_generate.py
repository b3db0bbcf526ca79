"""Text generation from a saved language model (task=causal_lm): greedy is the argmax of the model's
own logits, top_k with a seed is reproducible, FP8 state stays frozen, the saved MLflow model (and a
keras-hub family's classifier) serves without fp8exp, and `python -m fp8exp.predict` continues texts
from a run trained end to end, with bad settings one clear line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fp8exp.config import validate
from fp8exp.data import bpe
from fp8exp.models import families
from fp8exp.precision import policy
from fp8exp.run import tasks, train
from fp8exp.serve import locate, logged, predict, save, textmodel
from fp8exp.serve import meta as serve_meta
from tests.conftest import compose_config
from tests.test_data import write_table

VOCAB, LENGTH, MAX_LENGTH = 64, 16, 32
EOT = VOCAB - 1
IDS = ["5 17 33", "7 8 9 10 11 12", " ".join(str(2 + i % 50) for i in range(40))]  # the last is cut to fit
TEXTS = ["the dress is", "Très jolie robe ✓ — size\u00a0M"]


def tiny_lm(family: str = "llama", precision: str = "float32", steps: int = 0, vocabulary_size: int = VOCAB):
    """An untrained (or `steps`-trained) tiny CausalLM; float8 trains two steps so its scales move."""
    cfg = compose_config("task=causal_lm", f"model={family}_tiny", f"precision={precision}", "data=synthetic",
                         f"data.vocabulary_size={vocabulary_size}", f"data.sequence_length={LENGTH}")
    keras.utils.set_random_seed(0)
    net = policy.build(cfg.precision, lambda: families.build_causal_lm(cfg.model, vocabulary_size))
    if steps:
        train.compile_model(net, policy.optimizer(cfg.precision, 1e-3), trainer=cfg.trainer,
                            **tasks.compile_options(cfg, None))
        windows = np.random.default_rng(0).integers(0, vocabulary_size, (32 * steps, LENGTH + 1)).astype(np.int32)
        x, y, weight = families.causal_lm_batch(windows)
        net.fit(x, y, sample_weight=weight, batch_size=32, epochs=1, verbose=0)
    return net


def lm_meta(net, precision: str = "float32", vocabulary=None, **fields) -> dict:
    return serve_meta.describe(net, precision=precision, class_names=[], sequence_length=LENGTH, lowercase=False,
                         vocabulary_size=len(vocabulary) if vocabulary else VOCAB, has_vocabulary=vocabulary is not None,
                         fp8exp_version="test", task="causal_lm", end_of_text_id=(len(vocabulary) if vocabulary else VOCAB) - 1,
                         max_length=MAX_LENGTH, **fields)


def saved(net, meta: dict, directory: Path, vocabulary=None, merges=None) -> Path:
    return save.save_mlflow_model(directory, net, meta, vocabulary, merges=merges)


def argmax_continuations(net, prompts: list[np.ndarray], new_tokens: int, end: int) -> list[list[int]]:
    """Greedy by hand: the model's full forward pass (no cache, no sampler) over each sequence so far,
    the argmax of its last position's logits, one token at a time until `end`. The sequences are
    padded to one shape, which a causal model's earlier positions never see."""
    rows = [[int(i) for i in prompt] for prompt in prompts]
    done = [False] * len(rows)
    for _ in range(new_tokens):
        x, mask = np.zeros((len(rows), MAX_LENGTH), np.int32), np.zeros((len(rows), MAX_LENGTH), bool)
        for row, ids in enumerate(rows):
            x[row, :len(ids)], mask[row, :len(ids)] = ids, True
        logits = np.asarray(net.predict_on_batch({"token_ids": x, "padding_mask": mask}), np.float32)
        for row, ids in enumerate(rows):
            token = int(np.argmax(logits[row, len(ids) - 1]))
            done[row] = done[row] or token == end
            if not done[row]:
                ids.append(token)
    return [ids[len(prompt):] for ids, prompt in zip(rows, prompts)]


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    """An untrained float32 llama, saved and loaded back, and the net it came from."""
    net = tiny_lm()
    return net, textmodel.load(saved(net, lm_meta(net), tmp_path_factory.mktemp("lm") / "model"))


def test_greedy_is_the_argmax_of_the_model_s_logits_and_deterministic(generator):
    net, loaded = generator
    assert isinstance(loaded, textmodel.TextGenerator)
    settings = textmodel.Settings(max_new_tokens=6)
    result = loaded.generate(IDS, settings)
    prompts, truncated = loaded.prompts(IDS, 6)
    assert truncated == 1 and len(prompts[2]) == MAX_LENGTH - 6 and prompts[0].tolist() == [EOT, 5, 17, 33]
    for row, expected in enumerate(argmax_continuations(net, prompts, 6, EOT)):
        assert result.token_ids[row].tolist() == expected, row
        assert result.texts[row] == " ".join(map(str, expected))
        assert result.ended[row] == (len(expected) < 6)
    again = loaded.generate(IDS, settings)
    assert again.texts == result.texts


def test_top_k_with_a_seed_is_reproducible_and_differs_from_greedy(generator):
    _, loaded = generator
    greedy = loaded.generate(IDS[:2], textmodel.Settings(max_new_tokens=8)).texts
    sampled = {seed: loaded.generate(IDS[:2], textmodel.Settings(8, "top_k", 40, seed)).texts for seed in (1, 2)}
    assert loaded.generate(IDS[:2], textmodel.Settings(8, "top_k", 40, 1)).texts == sampled[1]
    # Untrained, the model's distribution is nearly flat: 40 candidates a token make a match by chance ~0.
    assert sampled[1] != sampled[2] and sampled[1] != greedy
    assert loaded.generate(IDS[:2], textmodel.Settings(max_new_tokens=8)).texts == greedy  # greedy's own function again


def fp8_state(model) -> dict[str, np.ndarray]:
    return {v.path: np.array(v.value) for v in model.variables if v.path.endswith(("_scale", "_amax_history"))}


@pytest.mark.slow
def test_generation_leaves_fp8_scales_and_amax_histories_bit_identical(tmp_path):
    net = tiny_lm("llama", "float8", steps=2)
    loaded = textmodel.load(saved(net, lm_meta(net, "float8"), tmp_path / "model"))
    before = fp8_state(loaded.model)
    assert len(before) == 14 * 6  # 2 layers x (q, k, v, o, gate, up, down) x inputs/kernel/outputs_grad
    assert any(path.endswith("_scale") and float(value) != 1.0 for path, value in before.items())
    original = fp8_state(net)
    assert all(np.array_equal(original[path], value) for path, value in before.items())  # saved bit for bit
    loaded.generate(IDS, textmodel.Settings(max_new_tokens=4))
    loaded.generate(IDS, textmodel.Settings(4, "top_k", 10, 0))
    after = fp8_state(loaded.model)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)


# ---------------------------------------------------------------- real text, and without fp8exp


@pytest.fixture(scope="module")
def bpe_tokenizer():
    corpus = ["the dress is lovely and the fabric is soft", "too small, sent it back. très jolie ✓"] * 10
    return bpe.train(corpus, 300)


def test_the_saved_bpe_tokenizer_gives_training_s_ids_and_writes_them_back(bpe_tokenizer):
    vocabulary, merges = bpe_tokenizer
    meta = {"input": "text", "tokenizer": "bpe", "lowercase": False, "vocabulary_size": len(vocabulary),
            "special_tokens": [bpe.END_OF_TEXT]}
    tokens = textmodel.tokens.Tokens(meta, {"vocabulary": vocabulary, "merges": merges})
    texts = [*TEXTS, f"two{bpe.END_OF_TEXT}documents", "tabs\tand\nnewlines  ", "emoji 👗👗 and ünïcödé"]
    expected = bpe.encode(texts, vocabulary, merges)
    for row, ids in enumerate(tokens.encode(texts)):
        assert ids.tolist() == expected[row].tolist(), texts[row]
        assert tokens.decode(ids) == texts[row]


@pytest.mark.slow
def test_a_saved_language_model_and_a_family_classifier_serve_without_fp8exp(tmp_path, bpe_tokenizer):
    vocabulary, merges = bpe_tokenizer
    lm = tiny_lm("gpt2", vocabulary_size=len(vocabulary))
    lm_dir = saved(lm, lm_meta(lm, vocabulary=vocabulary, tokenizer="bpe", special_tokens=[bpe.END_OF_TEXT]),
                   tmp_path / "lm", vocabulary, merges)
    cfg = compose_config("model=llama_tiny", "precision=float32", "data=synthetic", f"data.vocabulary_size={VOCAB}")
    keras.utils.set_random_seed(0)
    classifier = families.build_classifier(cfg.model, VOCAB, 2)
    meta = serve_meta.describe(classifier, precision="float32", class_names=["neg", "pos"], sequence_length=LENGTH,
                         lowercase=False, vocabulary_size=VOCAB, has_vocabulary=False, fp8exp_version="test")
    assert meta["keras_inputs"] == "token_ids+padding_mask" and meta["task"] == "classify"
    classifier_dir = saved(classifier, meta, tmp_path / "classifier")
    for directory in (lm_dir, classifier_dir):
        assert {p.name for p in (directory / "code").iterdir()} == {"textmodel", "pooling.py", "recipes"}
    assert {p.name for p in (lm_dir / "artifacts").iterdir()} == {"model.keras", "fp8exp_model.json",
                                                                  "vocabulary.txt", "merges.txt"}

    generator = textmodel.load(lm_dir)
    greedy = generator.generate(TEXTS, textmodel.Settings(max_new_tokens=6))
    top_k = generator.generate(TEXTS, textmodel.Settings(6, "top_k", 20, 3))
    expected = textmodel.TextClassifier.load(classifier_dir).classify(IDS)
    ids, _ = textmodel.tokens.Tokens(meta, {}).padded(IDS, LENGTH)
    direct = np.asarray(classifier.predict_on_batch(families.classifier_inputs(ids)))[:, 0]
    np.testing.assert_allclose(expected.probabilities[:, 1], direct, rtol=1e-6)

    script = ("import json, sys; sys.modules['fp8exp'] = None\n"
              "import mlflow.pyfunc\n"
              "lm, classifier = (mlflow.pyfunc.load_model(path) for path in sys.argv[1:3])\n"
              "texts, ids = json.loads(sys.argv[3]), json.loads(sys.argv[4])\n"
              "out = {'greedy': list(lm.predict(texts, params={'max_new_tokens': 6})['generated']),\n"
              "       'top_k': list(lm.predict({'text': texts}, params={'max_new_tokens': 6, 'sampler': 'top_k',\n"
              "                                                         'top_k': 20, 'seed': 3})['generated']),\n"
              "       'labels': list(classifier.predict(ids)['label'])}\n"
              "try:\n"
              "    lm.predict(texts, params={'sampler': 'beam'})\n"
              "except Exception as error:\n"
              "    out['error'] = str(error)\n"
              "import keras; assert keras.backend.backend() == 'jax', keras.backend.backend()\n"
              "assert sys.modules['fp8exp'] is None and not [m for m in sys.modules if m.startswith('fp8exp.')]\n"
              "print(json.dumps(out))\n")
    environment = {name: value for name, value in os.environ.items() if name != "KERAS_BACKEND"}  # fp8exp sets it
    result = subprocess.run([sys.executable, "-c", script, str(lm_dir), str(classifier_dir), json.dumps(TEXTS),
                             json.dumps(IDS)], capture_output=True, text=True, cwd=tmp_path, env=environment,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.splitlines()[-1])
    assert served["greedy"] == greedy.texts and served["top_k"] == top_k.texts
    assert served["labels"] == expected.labels
    assert "sampler: got 'beam'; valid: greedy, top_k" in served["error"]


# ---------------------------------------------------------------- a run, end to end, and the predict command


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """(store URI, run id): gpt2_tiny in float8 trained a few steps as a language model on a small
    table of reviews (byte-level BPE), tracked in a SQLite store, its model saved."""
    from fp8exp.run.experiment import run_experiment

    root = tmp_path_factory.mktemp("lm-run")
    table = write_table(root / "reviews.csv", rows=240, classes=("neg", "pos"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = compose_config("task=causal_lm", "model=gpt2_tiny", "precision=float8", "data=table", f"data.path={table}",
                         "data.text_column=body", "data.label_column=sentiment", f"data.cache_dir={root / 'cache'}",
                         "data.vocabulary_size=300", f"data.sequence_length={LENGTH}", "trainer.epochs=1",
                         "trainer.steps_per_epoch=4", "trainer.eval_steps=1", "trainer.batch_size=8",
                         f"tracking.uri={uri}", f"tracking.artifact_root={root / 'artifacts'}",
                         "tracking.experiment=generate", "tracking.fp8_probe=false", "tracking.fp8_gemm_check=false")
    validate(cfg)
    return uri, run_experiment(cfg).run_id


def unescape(text: str) -> str:
    table = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
    out, chars = [], iter(text)
    for char in chars:
        out.append(table[next(chars)] if char == "\\" else char)
    return "".join(out)


def generate_cli(uri: str, run_id: str, *args: str) -> list[str]:
    out = io.StringIO()
    assert predict.main([f"run_id={run_id}", f"tracking.uri={uri}", *args], out=out) == 0
    return out.getvalue().splitlines()


@pytest.mark.slow
def test_predict_continues_texts_with_a_trained_language_model_as_the_pyfunc_model_does(lm_run, tmp_path):
    import mlflow.pyfunc

    uri, run_id = lm_run
    located = locate.locate(run_id, uri, tmp_path)
    meta = json.loads((located.directory / "artifacts" / "fp8exp_model.json").read_text())
    assert meta["task"] == "causal_lm" and meta["tokenizer"] == "bpe" and meta["model_class"] == "GPT2CausalLM"
    assert meta["tokenizer_files"] == ["merges.txt", "vocabulary.txt"] and meta["special_tokens"] == [bpe.END_OF_TEXT]
    assert meta["end_of_text_id"] == meta["vocabulary_size"] - 1 and meta["max_length"] == LENGTH  # the trained window
    assert meta["sequence_length"] == LENGTH and meta["quantized_layers"]
    model = MlflowClient(uri).get_logged_model(located.model_id)
    assert model.model_type == logged.MODEL_TYPES["causal_lm"] and model.tags["fp8exp.task"] == "causal_lm"

    args = [f"text={text}" for text in TEXTS]
    lines = [json.loads(line) for line in generate_cli(uri, run_id, *args, "max_new_tokens=5", "format=jsonl")]
    assert [line["text"] for line in lines] == TEXTS
    assert all(0 < line["new_tokens"] <= 5 or line["end_of_text"] for line in lines)
    tsv = [row.split("\t") for row in generate_cli(uri, run_id, *args, "max_new_tokens=5")]
    assert [text for _, text in tsv] == ["the dress is", "Très jolie robe ✓ — size M"]  # whitespace runs: one space
    assert [unescape(generated) for generated, _ in tsv] == [line["generated"] for line in lines]
    served = mlflow.pyfunc.load_model(str(located.directory))
    assert list(served.predict(TEXTS, params={"max_new_tokens": 5})["generated"]) == [line["generated"] for line in lines]
    sampled = [generate_cli(uri, run_id, *args, "sampler=top_k", "top_k=50", "seed=7") for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_generation_settings_are_checked_before_anything_loads(capsys):
    cases = {"sampler=beam": "sampler: got 'beam'; valid: greedy, top_k",
             "max_new_tokens=0": "max_new_tokens: got 0, expected at least 1",
             "max_new_tokens=many": "max_new_tokens: got 'many', expected a number",
             "top_k=5": "top_k: only with sampler=top_k",
             "seed=3": "seed: only with sampler=top_k"}
    for setting, message in cases.items():
        assert predict.main(["run_id=x", "text=hello", setting], out=io.StringIO()) == 2, setting
        err = capsys.readouterr().err.strip()
        assert err == f"fp8exp.predict: error: {message}" or (err.startswith(f"fp8exp.predict: error: {message}")
                                                              and "\n" not in err), (setting, err)
    assert predict.main(["run_id=x", "text=hello", "sampler=top_k", "top_k=1", "seed=-1"]) == 2
    assert "seed: got -1, expected at least 0" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    ([f"max_new_tokens={LENGTH}"], f"max_new_tokens: got {LENGTH}; valid: a whole number from 1 to {LENGTH - 1} "
                                   f"(the model's maximum length {LENGTH}, prompt included, less one prompt token)"),
    (["sampler=top_k", "top_k=100000"], "top_k: got 100000; valid: a whole number from 1 to "),
    (["sampler=top_k", "seed=4294967296"], "seed: got 4294967296; valid: a whole number from 0 to 4294967295"),
    ("classifier", "max_new_tokens: run "),
])
def test_generation_settings_the_model_cannot_take_are_one_line_and_exit_2(lm_run, tmp_path, capsys, args, message):
    uri, run_id = lm_run
    if args == "classifier":  # a run whose model is a classifier: generation settings are an error
        client = MlflowClient(uri)
        run_id = client.create_run(client.get_experiment_by_name("generate").experiment_id).info.run_id
        net = families.build_classifier(compose_config("model=llama_tiny").model, VOCAB, 2)
        meta = serve_meta.describe(net, precision="float32", class_names=["neg", "pos"], sequence_length=LENGTH,
                             lowercase=False, vocabulary_size=VOCAB, has_vocabulary=False, fp8exp_version="test")
        client.log_artifacts(run_id, str(saved(net, meta, tmp_path / "model")), "model")
        client.set_terminated(run_id)
        args = ["max_new_tokens=5"]
    code = predict.main([f"run_id={run_id}", "text=the dress", f"tracking.uri={uri}", *args], out=io.StringIO())
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("fp8exp.predict: error: ") and "\n" not in err and message in err, err
    if message.startswith("max_new_tokens: run"):
        assert "is a classifier (task=classify); max_new_tokens, sampler, top_k, seed are for language models" in err


def test_a_bpe_without_merges_round_trips(tmp_path):
    """data.vocabulary_size=257 (the bytes and <|endoftext|>) learns no merges: an empty file, read back as none."""
    from fp8exp.serve.textmodel.files import read_lines

    (tmp_path / "merges.txt").write_text("")
    (tmp_path / "two.txt").write_text("a b\nc d\n")
    assert read_lines(tmp_path / "merges.txt", "merges") == []
    assert read_lines(tmp_path / "two.txt", "merges") == ["a b", "c d"]

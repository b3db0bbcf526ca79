"""Models trained with an FP8 recipe save, reload, predict, generate and benchmark like the others:
a recipe classifier run end to end saves its LoggedModel, which reloads (also in a process where
fp8exp cannot be imported) as recipe layers with the run's recipe options and predicts exactly what
the in-memory model did; `fp8exp.predict` and `fp8exp.infer_bench` take the run; a keras-hub language
model with a recipe (every recipe layer inside a block, so none in the file's config) generates the
same after reloading; and a recipe run interrupted mid-epoch resumes to the uninterrupted result."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fp8exp.precision.recipes.layers import RecipeDense, apply_recipe, recipe_layers
from fp8exp.precision.recipes.recipe import make_recipe
from fp8exp.run import checkpoint, experiment, stopping
from fp8exp.serve import bench, locate, predict, textmodel
from tests.conftest import tracked
from tests.test_generate import EOT, IDS, argmax_continuations, lm_meta, saved, tiny_lm
from tests.test_precision import EXPECTED_TINY_FP8_LAYERS

# Non-default options, so that a reload which dropped one would show.
RECIPE = make_recipe("mxfp8", block_size=16, grad_format="e5m2")
RUN = ("precision=float8", "precision.recipe=mxfp8", "precision.block_size=16", "precision.grad_format=e5m2",
       "trainer.checkpoint_every=8", "tracking.fp8_probe=false", "tracking.fp8_gemm_check=false")
LM_RECIPE = make_recipe("block", block_size=32, power_of_2_scales=False)
EXAMPLES = 8


def uri(store) -> str:
    return f"sqlite:///{store / 'mlflow.db'}"


def texts_of(ids: np.ndarray) -> list[str]:
    """A synthetic run's inputs as the served model takes them: token ids separated by spaces."""
    return [" ".join(map(str, row)) for row in ids]


def recipes_of(model) -> dict[str, list]:
    return {layer.path: [type(layer).__name__, layer.recipe.get_config()] for layer in recipe_layers(model)}


def expected_classifier_layers() -> dict[str, list]:
    """The reference classifier's 8 FP8 layers, each running the run's recipe with its options."""
    return {path: ["RecipeEinsumDense" if "self_attention/" in path else "RecipeDense", RECIPE.get_config()]
            for path in EXPECTED_TINY_FP8_LAYERS}


@pytest.fixture(scope="module")
def reference(store):
    """(run id, its model's directory, the in-memory model's outputs on test examples) of one mxfp8
    classifier run, uninterrupted."""
    captured = {}
    log_model = experiment.log_model

    def capturing(run, net, splits, cfg, staging):
        # Batched as the served model will be: on CPU, XLA's float32 dot rounds differently with the
        # number of rows, and FP8 rounding can carry that last bit on to the output.
        x, batch = splits.x_test, textmodel.classify.INFERENCE_BATCH
        whole = np.concatenate([np.asarray(net.predict_on_batch(x[i:i + batch])) for i in range(0, len(x), batch)])
        captured.update(x=x[:EXAMPLES], outputs=np.asarray(net.predict_on_batch(x[:EXAMPLES])),
                        accuracy=float(np.mean((whole[:, 0] > 0.5) == splits.y_test)), class_names=splits.class_names)
        return log_model(run, net, splits, cfg, staging)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiment, "log_model", capturing)
        run_id = experiment.run_experiment(tracked(store, *RUN, "tracking.experiment=recipe-reference")).run_id
    return run_id, locate.locate(run_id, uri(store), store).directory, captured


@pytest.fixture(scope="module")
def language_model(tmp_path_factory):
    """An untrained tiny llama with a block recipe in all 14 projections, and its saved model."""
    net = tiny_lm()
    applied = apply_recipe(net, LM_RECIPE)
    assert len(applied.layers) == 14 and not applied.high_precision
    return net, saved(net, lm_meta(net, "float8"), tmp_path_factory.mktemp("recipe-lm") / "model")


@pytest.mark.slow
def test_a_recipe_run_saves_a_model_that_reloads_as_its_recipe_layers_predicting_the_same(store, reference):
    run_id, directory, captured = reference
    located = locate.locate(run_id, uri(store), store)
    assert located.model_id is not None  # a LoggedModel, as for every other run
    model = MlflowClient(uri(store)).get_logged_model(located.model_id)
    assert str(model.status).endswith("READY") and model.tags["fp8exp.recipe_layers"] == "8"
    meta = json.loads((directory / "artifacts" / "fp8exp_model.json").read_text())
    written = {path: [entry["class_name"].split(">")[1], entry["recipe"]] for path, entry in meta["recipe_layers"].items()}
    assert written == expected_classifier_layers() and not meta["quantized_layers"]
    assert meta["format"] == 3  # an fp8exp that reads only formats 1-2 refuses it rather than drop the recipes
    assert (directory / "code" / "recipes" / "layers.py").is_file()

    loaded = textmodel.load(directory)
    assert recipes_of(loaded.model) == expected_classifier_layers()  # the attention's too: built by its block
    np.testing.assert_array_equal(np.asarray(loaded.model.predict_on_batch(captured["x"])), captured["outputs"])


SCRIPT = """
import json, sys
sys.modules["fp8exp"] = None
import mlflow.pyfunc
out = {}
for kind, path, texts, params in json.loads(sys.argv[1]):
    model = mlflow.pyfunc.load_model(path)
    keras_model = model.unwrap_python_model().model.model
    out[kind] = {"answer": model.predict(texts, params=params).to_dict("list"),
                 "layers": {layer.path: [type(layer).__name__, layer.recipe.get_config()]
                            for layer in keras_model._flatten_layers(include_self=False) if hasattr(layer, "recipe")}}
assert sys.modules["fp8exp"] is None and not [m for m in sys.modules if m.startswith("fp8exp.")]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_saved_recipe_models_serve_without_fp8exp(reference, language_model, tmp_path):
    _, directory, captured = reference
    net, lm_directory = language_model
    jobs = [["classify", str(directory), texts_of(captured["x"]), None],
            ["causal_lm", str(lm_directory), IDS[:2], {"max_new_tokens": 4}]]
    environment = {name: value for name, value in os.environ.items() if name != "KERAS_BACKEND"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(jobs)], capture_output=True, text=True,
                            cwd=tmp_path, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.splitlines()[-1])

    p = captured["outputs"][:, 0].astype(np.float64)  # the sigmoid head: P(class 1)
    assert served["classify"]["layers"] == expected_classifier_layers()
    assert served["classify"]["answer"]["label"] == [captured["class_names"][int(v > 0.5)] for v in p]
    assert served["classify"]["answer"]["probability"] == pytest.approx(np.maximum(p, 1 - p).tolist(), abs=1e-6)
    assert served["causal_lm"]["layers"] == recipes_of(net) and len(recipes_of(net)) == 14
    prompts, _ = textmodel.load(lm_directory).prompts(IDS[:2], 4)
    expected = argmax_continuations(net, prompts, 4, EOT)
    assert served["causal_lm"]["answer"]["generated"] == [" ".join(map(str, ids)) for ids in expected]


@pytest.mark.slow
def test_predict_and_infer_bench_take_a_recipe_run(store, reference, tmp_path):
    run_id, _, captured = reference
    out = io.StringIO()
    texts = [f"text={text}" for text in texts_of(captured["x"])]
    assert predict.main([f"run_id={run_id}", *texts, "format=jsonl", f"tracking.uri={uri(store)}"], out=out) == 0
    p = captured["outputs"][:, 0].astype(np.float64)
    answers = [json.loads(line)["probabilities"][captured["class_names"][1]] for line in out.getvalue().splitlines()]
    assert answers == pytest.approx(p.tolist(), abs=1e-6)

    assert bench.main([f"run_id={run_id}", f"tracking.uri={uri(store)}", f"out={tmp_path}", "batch_sizes=1,4",
                       "seconds=0"]) == 0
    metrics = MlflowClient(uri(store)).get_run(run_id).data.metrics
    assert metrics["infer/as_trained/accuracy"] == captured["accuracy"]  # the in-memory model's, batched alike
    assert metrics["infer/latency_ms_b4"] > 0 and "| float8 " in (tmp_path / "inference.md").read_text()


@pytest.mark.slow
def test_a_recipe_language_model_generates_from_its_run_with_nothing_changed(store, language_model, tmp_path):
    net, directory = language_model
    loaded = textmodel.load(directory)
    assert recipes_of(loaded.model) == recipes_of(net)  # all 14 rebuilt as plain layers by their blocks: restored
    before = {v.path: np.array(v.value) for v in loaded.model.variables}
    client = MlflowClient(uri(store))
    run_id = client.create_run(client.create_experiment("recipe-lm", str(tmp_path / "artifacts"))).info.run_id
    client.log_artifacts(run_id, str(directory), "model")
    client.set_terminated(run_id)
    out = io.StringIO()
    assert predict.main([f"run_id={run_id}", f"text={IDS[0]}", "max_new_tokens=4", "format=jsonl",
                         f"tracking.uri={uri(store)}"], out=out) == 0
    prompts, _ = loaded.prompts(IDS[:1], 4)
    [expected] = argmax_continuations(net, prompts, 4, EOT)
    assert json.loads(out.getvalue())["generated"] == " ".join(map(str, expected))
    loaded.generate(IDS, textmodel.Settings(4, "top_k", 10, 0))
    after = {v.path: np.array(v.value) for v in loaded.model.variables}
    assert len(after) == len(before) == len(loaded.model.variables)
    for path, value in before.items():  # inference leaves every variable, the scale records too, as it was
        np.testing.assert_array_equal(after[path], value, err_msg=path)


@pytest.mark.slow
def test_a_recipe_run_stopped_mid_epoch_resumes_to_the_uninterrupted_run(store, reference, monkeypatch):
    run_id, directory, _ = reference
    stop_after = checkpoint.Checkpointer.on_train_batch_end

    def sigterm_at_step_20(self, batch, logs=None):  # mid epoch 2 (16 steps each), 4 steps after a checkpoint
        if self.step == 19:
            self.stop.signum = signal.SIGTERM
        return stop_after(self, batch, logs)

    monkeypatch.setattr(checkpoint.Checkpointer, "on_train_batch_end", sigterm_at_step_20)
    resumed_cfg = (*RUN, "tracking.experiment=recipe-resumed")
    with pytest.raises(stopping.Interrupted) as stopped:
        experiment.run_experiment(tracked(store, *resumed_cfg))
    assert stopped.value.checkpoint_step == 20
    monkeypatch.undo()
    resumed = experiment.run_experiment(tracked(store, *resumed_cfg, "trainer.resume=true"))
    assert resumed.run_id == stopped.value.run_id

    client = MlflowClient(uri(store))
    keys = [key for key in client.get_run(run_id).data.metrics
            if key.split("/")[0] in ("train", "val", "test", "fp8")]
    assert len([key for key in keys if key.startswith("fp8/")]) >= 8 * 3 * 6
    for key in keys:
        history = [[(m.step, m.value) for m in client.get_metric_history(one, key)] for one in (run_id, resumed.run_id)]
        assert history[1] == history[0], key
    weights = [{v.path: np.asarray(v.value) for v in textmodel.load(where).model.variables
                if "seed_generator" not in v.path}
               for where in (directory, locate.locate(resumed.run_id, uri(store), store).directory)]
    assert set(weights[1]) == set(weights[0]) and len(weights[0]) > 8 * 2
    for path, value in weights[0].items():  # the saved models: the weights training reached
        np.testing.assert_array_equal(weights[1][path], value, err_msg=path)


def test_recipe_layers_a_loader_cannot_restore_are_one_clear_error():
    unknown = {"class_name": "fp8exp>RecipeLinear", "recipe": RECIPE.get_config(), "track_scales": True}
    with pytest.raises(textmodel.ModelFileError, match=r"^layer 'head' runs FP8 recipe 'mxfp8' in class "
                       r"fp8exp>RecipeLinear, which is not registered: import the model's code/recipes/layers.py"):
        textmodel.files.recipe_classes({"recipe_layers": {"head": unknown}})
    with pytest.raises(textmodel.ModelFileError, match=r"recipe_layers\['head'\] is 'mxfp8', not a layer class"):
        textmodel.files.recipe_classes({"recipe_layers": {"head": "mxfp8"}})
    import fp8exp.models.pooling  # noqa: F401  (registers fp8exp>SequencePooling: registered, not a recipe layer)

    pooling = {**unknown, "class_name": "fp8exp>SequencePooling"}
    with pytest.raises(textmodel.ModelFileError, match=r"names fp8exp>SequencePooling, which is not an FP8 recipe layer"):
        textmodel.files.recipe_classes({"recipe_layers": {"head": pooling}})
    einsum = keras.layers.EinsumDense("ab,bc->ac", (4,), name="proj")
    einsum.build((2, 8))
    with pytest.raises(TypeError, match="^proj: EinsumDense cannot become RecipeDense, only Dense can$"):
        RecipeDense.adopt(einsum, RECIPE)
    with pytest.raises(ValueError, match=r"^RecipeDense: \{'name': 'mxfp8', 'tile': 3\} is not a recipe config"):
        RecipeDense(4, recipe={"name": "mxfp8", "tile": 3})


def test_a_pyfunc_loaded_where_fp8exp_is_uses_fp8exps_own_recipe_layers(reference):
    """One class per registered name in a process: the shipped copy must not shadow fp8exp's, or
    fp8exp's own checks (recipe_layers, scale metrics) would find no recipe layer in the model.
    A fresh process, so that fp8exp's recipe layers are not imported before the model loads."""
    _, directory, _ = reference
    script = ("import sys, fp8exp, mlflow.pyfunc\n"
              "served = mlflow.pyfunc.load_model(sys.argv[1]).unwrap_python_model().model.model\n"
              "from fp8exp.precision.recipes.layers import recipe_layers\n"
              "print(len(recipe_layers(served)))\n")
    found = subprocess.run([sys.executable, "-c", script, str(directory)], capture_output=True, text=True, check=True)
    assert int(found.stdout.split()[-1]) == len(expected_classifier_layers())

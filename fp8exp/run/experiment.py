"""One experiment end to end. Data flows one way: config -> data -> model -> precision ->
train; tracking watches through callbacks and a run context."""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import keras
from omegaconf import DictConfig

from fp8exp import data
from fp8exp.config import ConfigError
from fp8exp.config.schema import model_name
from fp8exp.precision import policy
from fp8exp.precision.gemm import inspect_train_step
from fp8exp.precision.health import check_health, layer_table
from fp8exp.precision.probe import Probe
from fp8exp.precision.scales import state_size
from fp8exp.precision.whatif import WhatIf, plot_sqnr, to_csv
from fp8exp.run import checkpoint, distribution, processes, stopping, tasks, train
from fp8exp.run.launch import LaunchContext, git_state, run_name, source_tags
from fp8exp.run.resume import config_hash, find_resume
from fp8exp.serve.save import log_model
from fp8exp.tracking.callbacks import EpochLogger, Fp8StateLogger, Heartbeat, StepLogger, process_tags
from fp8exp.tracking.context import open_run
from fp8exp.tracking.datasets import dataset_inputs
from fp8exp.tracking.store import check_reachable, ui_command

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    run_id: str | None
    run_name: str
    metrics: dict[str, float]
    note: str = ""
    """What happened to the tracking data, when the tracking server was away (else empty)."""


def environment_tags(cfg: DictConfig, context: LaunchContext) -> dict[str, str]:
    import jax

    devices = jax.devices()
    tags = {
        "precision": cfg.precision.name,
        "model": model_name(cfg.model),
        "data": cfg.data.name,
        "overrides": " ".join(context.overrides),
        "backend": keras.backend.backend(),
        "device": f"{devices[0].platform}:{devices[0].device_kind} x{len(devices)}",
        **{f"version.{name}": metadata.version(name) for name in ("fp8exp", "keras", "keras-hub", "jax")},
        **git_state(),
        **source_tags(context.entry_point),
        **process_tags(),
    }
    if context.output_dir:
        tags["hydra.output_dir"] = context.output_dir
    if context.sweep:
        tags.update(context.sweep.child_tags())
    return tags


def run_experiment(cfg: DictConfig, context: LaunchContext | None = None) -> Outcome:
    """Train and evaluate one configuration; `cfg` must already have passed config.validate.
    Raises ConfigError for settings only checkable at run time (an unreachable tracking server,
    a run that cannot be resumed), stopping.Interrupted when a signal stopped it (after a
    checkpoint) and stopping.NumericalFault when the loss or an FP8 scale went non-finite."""
    context = context or LaunchContext()
    here = processes.detect(cfg.distribution)  # several processes: process 0 alone reads and writes MLflow
    online, resume = True, None
    if here.lead:
        with processes.lead_checks(here, cfg.distribution.timeout_s):  # a failure here is told to the others
            online = check_reachable(cfg)
            if cfg.trainer.resume or cfg.trainer.resume_from:
                resume = find_resume(cfg, online)
    with stopping.GracefulStop() as stop, processes.reporting(here):
        if here.many:  # before any JAX computation
            resume = distribution.start(cfg, here, resume)
        keras.utils.set_random_seed(cfg.trainer.seed)
        try:
            with distribution.scope(distribution.make(cfg.distribution, cfg.model)):
                return _run(cfg, context, resume, stop, online, here)
        except stopping.Interrupted as interrupted:
            if interrupted.checkpoint_step is not None:
                interrupted.resume_hint = ("; to continue, rerun the same command with trainer.resume=true "
                                           f"(or trainer.resume_from={interrupted.run_id})")
            raise


def _run(cfg: DictConfig, context: LaunchContext, resume, stop, online: bool,
         here: processes.Processes) -> Outcome:
    task = tasks.task_name(cfg)
    strategy = keras.distribution.distribution()  # set by run_experiment from cfg.distribution
    distribution.check_batch(strategy, cfg.trainer.batch_size)
    splits = data.load(cfg.data, task)
    name = run_name(cfg, context.swept)
    splits = splits.divisible_by(distribution.batch_ways(strategy))

    net = policy.build(cfg.precision, lambda: tasks.build_model(cfg, splits))
    train.compile_model(net, policy.optimizer(cfg.precision, cfg.trainer.learning_rate), trainer=cfg.trainer,
                        **tasks.compile_options(cfg, splits))
    to_inputs = tasks.batch_inputs(cfg)  # split rows -> (model inputs, labels)
    steps = train.steps_per_epoch(len(splits.y_train), cfg.trainer)
    start_step = resume.state.step if resume else 0
    if resume and resume.state.meta["steps_per_epoch"] != steps:
        raise ConfigError("trainer.resume", f"the checkpoint has {resume.state.meta['steps_per_epoch']} steps "
                          f"per epoch, this data and config {steps}: the training data changed")
    run_hash = config_hash(cfg)
    tags = {**environment_tags(cfg, context), "task": task, "fp8exp.config_hash": run_hash, **recipe_tags(cfg, net)}

    def owned(run) -> None:  # from the moment the run exists, another process's failure ends it
        here.on_failure = functools.partial(end_for_peer, run, cfg, here.count)

    # Checkpoints bound for a tracking server are staged here until uploaded (even if that waits
    # for the offline copy, written when the run closes).
    with tempfile.TemporaryDirectory(prefix="fp8exp-checkpoint-") as staging_dir, \
            open_run(cfg, name, tags, resume_run_id=resume.run_id if resume else None, offline=not online,
                     checkpoint_root=context.output_dir, shield=stop.deferred, lead=here.lead, opened=owned) as run:
        staging = Path(staging_dir)
        here.stopping = lambda: stop.requested
        try:
            if resume is None:
                run.log_metrics({"model/params": net.count_params() - state_size(net), **splits.metrics()})
                run.log_inputs(dataset_inputs(**splits.dataset_summary()))  # the UI's Dataset column
                run.set_tags({"data.class_names": ", ".join(splits.class_names),
                              "data.cache_hit": str(splits.cache_hit).lower()})
                if splits.vocabulary:
                    run.log_text("\n".join(splits.vocabulary), "vocabulary.txt")

            def save(model_, step):
                bad = stopping.non_finite_fp8(model_)
                if bad:  # never overwrite the last good checkpoint with a broken state
                    raise stopping.NumericalFault(step, "FP8 scale or amax", bad, checkpointer.last_saved)
                return checkpoint.store(run, checkpoint.capture(model_, step, steps, run_hash), staging)

            checkpointer = checkpoint.Checkpointer(cfg.trainer.checkpoint_every, steps, steps * cfg.trainer.epochs,
                                                   stop, save)
            checkpointer.start_at(start_step)
            guard = stopping.NonFiniteGuard(lambda: checkpointer.last_saved)
            trained_out = resume is not None and start_step >= steps * cfg.trainer.epochs
            if trained_out:
                # Stopped after its last step (during the final validation, say): nothing is left
                # to train, so the state goes in now, then evaluation, logging and saving follow.
                checkpoint.restore_untrained(net, resume.state)
                callbacks = []
            else:
                callbacks = [checkpoint.Restore(resume.state)] if resume else []
            callbacks += [*tasks.callbacks(cfg), EpochLogger(run), Heartbeat(run)]
            step_logger = StepLogger(run, cfg.tracking.get("log_every_steps"), cfg.trainer.eval_every_steps,
                                     validate=lambda model: train.validate(model, splits, cfg.trainer, to_inputs),
                                     derive=functools.partial(tasks.derived, cfg))
            callbacks.append(step_logger)
            fp8_logger = whatif = None
            if cfg.precision.name == "float8" and cfg.tracking.name != "none":
                probe_batch = slice(0, cfg.trainer.batch_size)
                probe = Probe(net, *to_inputs(splits.x_val[probe_batch], splits.y_val[probe_batch])) \
                    if cfg.tracking.fp8_probe else None
                whatif = WhatIf(policy.run_recipe(cfg.precision)) if probe and cfg.tracking.get("fp8_whatif") else None
                delayed = policy.run_recipe(cfg.precision) is None

                def fp8_sink(metrics, step):
                    # Each Keras scale is logged at the step that quantizes with it (one after the step
                    # that computed it; see scales.state_metrics), the amaxes and probe at this one;
                    # a recipe's scales are this step's own.
                    scales = {key: value for key, value in metrics.items() if delayed and key.endswith("_scale")}
                    run.log_metrics({key: value for key, value in metrics.items() if key not in scales}, step)
                    run.log_metrics(scales, step + 1)
                    guard.check_fp8_metrics(metrics, step)
                    if whatif is not None:  # after the probe's pass: its captures are this step's
                        run.log_text(to_csv(whatif.measure(net, probe, step)), f"fp8/whatif/step_{step}.csv")

                fp8_logger = Fp8StateLogger(cfg.tracking.fp8_log_every, fp8_sink, probe)
                # Logged before the interruption, the next log point follows from it; a run with
                # nothing left to train logs its final state at the end, unless it was a log point.
                if start_step and (not trained_out or start_step % cfg.tracking.fp8_log_every == 0):
                    fp8_logger.logged_steps.append(start_step)
                callbacks.append(fp8_logger)
            callbacks += [guard, checkpointer]

            with stop.deferred():  # until training ends: the Checkpointer acts on signals at step boundaries
                result = train.fit_and_evaluate(net, splits, cfg.trainer, callbacks, start_step=start_step,
                                                to_inputs=to_inputs)
            final = tasks.final_metrics(cfg, result.test)
            disturbed = [*(fp8_logger.logged_steps if fp8_logger else ()), *checkpointer.saved_steps,
                         *step_logger.disturbed]
            final.update(train.perf_metrics(result, cfg.trainer.batch_size, splits.sequence_length,
                                            disturbed_steps=disturbed))
            if isinstance(net.optimizer, keras.optimizers.LossScaleOptimizer):
                # Dynamic loss scaling: steps whose float16 gradients overflowed were skipped, not fatal.
                final["train/loss_scale"] = float(keras.ops.convert_to_numpy(net.optimizer.dynamic_scale))
                applied = int(keras.ops.convert_to_numpy(net.optimizer.inner_optimizer.iterations))
                final["train/skipped_steps"] = float(result.steps - applied)
            if cfg.precision.name == "float8":
                final.update(report_fp8(run, net, splits, cfg, fp8_logger, to_inputs, staging, whatif))
            run.log_metrics(final, step=result.steps)
            if cfg.tracking.get("save_model", True):
                with distribution.whole_weights(net):  # every process, even those that do not save
                    if run.run_id:
                        log_model(run, net, splits, cfg, staging)  # LoggedModel `model` (else artifact model/)
            here.solo = True  # no collective is left: the others may end as they like
        except stopping.Interrupted as interrupted:
            interrupted.run_id = run.run_id
            raise
        except Exception:
            processes.settle(here)  # before the run closes: a dead peer's watcher names it on the run
            raise

    here.on_failure = None  # the run has ended: a peer failing from now on cannot change it
    outcome = Outcome(run.run_id, name, final, run.delivery_note)
    print_summary(cfg, outcome)
    return outcome


def end_for_peer(run, cfg: DictConfig, count: int, index: int, why: str, status: str) -> None:
    """Process 0's run, when process `index` failed (FAILED, `failure.*`) or stopped at a signal
    that left this one waiting (KILLED, `killed.*`)."""
    key, what = ("failure", "error") if status == "FAILED" else ("killed", "reason")
    run.end_now(status, {f"{key}.process": str(index), f"{key}.{what}": f"process {index} of {count} "
                         f"{processes.VERBS[status]}: {why}"[:1000]}, cfg)


def recipe_tags(cfg: DictConfig, net) -> dict[str, str]:
    """`fp8.recipe` on every float8 run; for a recipe, the layers it pads or leaves in high precision."""
    applied = policy.applied_recipe(net, cfg.precision)
    tags = {"fp8.recipe": policy.recipe_name(cfg.precision)} if cfg.precision.name == "float8" else {}
    if applied is not None and applied.padded:
        tags["fp8.recipe.padded"] = "; ".join(f"{path}: {', '.join(why)}" for path, why in applied.padded.items())[:5000]
    if applied is not None and applied.high_precision:
        tags["fp8.recipe.high_precision"] = "; ".join(f"{p}: {why}" for p, why in applied.high_precision.items())[:5000]
    return tags


def report_fp8(run, net, splits, cfg: DictConfig, logger, to_inputs=train.as_they_are, staging: Path | None = None,
               whatif: WhatIf | None = None) -> dict[str, float]:
    """End-of-run FP8 verdicts: is the FP8 matmul real (compiled step), is FP8 healthy
    (scales, histories, probe), which layers it covers, and the what-if summary. Returns metrics to log."""
    metrics = report_fp8_gemm(run, net, splits, cfg, to_inputs) if cfg.tracking.fp8_gemm_check else {}
    applied = policy.applied_recipe(net, cfg.precision)
    if applied is not None:
        run.log_text("\n".join([f"recipe: {applied.recipe}", f"layers: {', '.join(applied.layers)}",
                                *policy.recipe_notes(applied)]) + "\n", "fp8/recipe.txt")
    if logger is not None and logger.probe is not None:
        if not logger.probe.captures:  # resumed at its last step, which was a log point: measure now
            started = time.perf_counter()
            logger.probe_metrics = logger.probe.metrics()
            logger.probe_seconds += time.perf_counter() - started
            if whatif is not None:
                whatif.measure(net, logger.probe, logger.logged_steps[-1] if logger.logged_steps else logger.step)
        health = check_health(net, logger.probe_metrics, cfg.tracking.fp8_warn_fraction, logger.probe.sizes)
        for message in health.messages():
            log.warning(message)
        run.set_tags(health.tags())
        run.log_text(layer_table(net, logger.probe.captures, logger.probe.matmul_shapes()), "fp8/layers.md")
        metrics["perf/fp8_probe_s"] = logger.probe_seconds
    if whatif is not None and whatif.last is not None:  # the last probe point: the state training ended in
        step, rows = whatif.last
        run.log_text(to_csv(rows, step), "fp8/whatif/summary.csv")
        if staging is not None and run.run_id:
            plot_sqnr(rows, staging / "sqnr.png", step)
            run.log_artifact(staging / "sqnr.png", "fp8/whatif")
        metrics["perf/fp8_whatif_s"] = whatif.seconds
    return metrics


def report_fp8_gemm(run, net, splits, cfg: DictConfig, to_inputs=train.as_they_are) -> dict[str, float]:
    """Tag fp8.gemm, log the compiled step's HLO, and say so when FP8 is only emulated."""
    started = time.perf_counter()
    batch = slice(0, cfg.trainer.batch_size)
    gemm = inspect_train_step(net, *to_inputs(splits.x_train[batch], splits.y_train[batch]))
    run.set_tags({"fp8.gemm": gemm.verdict})
    run.log_text(gemm.hlo, "fp8/train_step_hlo.txt")
    if gemm.verdict != "fused":
        log.warning("FP8 is %s on this device: %d of %d FP8 matmuls run as FP8 GEMMs, the rest are "
                    "quantize-dequantize in the compute dtype%s; compare accuracy here, not step time",
                    gemm.verdict, gemm.fused, gemm.fp8_matmuls,
                    f" ({gemm.dequantized} block-scaled ones by construction)" if gemm.dequantized else "")
    return {**gemm.metrics(), "perf/fp8_gemm_check_s": time.perf_counter() - started}


def print_summary(cfg: DictConfig, outcome: Outcome) -> None:
    metrics = outcome.metrics
    step = metrics.get("perf/step_time_ms")
    step_text = f"{step:.2f} ms/step (median)" if step is not None else "too few steps to time"
    print(f"\nfp8exp {outcome.run_name}: {tasks.headline(metrics)}, {step_text}")
    if outcome.run_id:
        print(f"MLflow run {outcome.run_id} in experiment '{cfg.tracking.experiment}'. "
              f"Browse: {ui_command(cfg)}")
    if outcome.note:
        print(outcome.note)

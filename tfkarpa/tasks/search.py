"""Search over config keys with Optuna: each trial an ordinary run in the study's folder.

`run(base, space_file, study_dir, options)` varies the keys of a search space (`search_space`)
on top of a recipe, trains every trial through the one fit loop (`tasks.run`), and keeps the
study in a database: SQLite in the study folder by default, any RDB URL Optuna takes
(PostgreSQL) for several machines. Several processes on one study share its trials; a process
killed mid-trial leaves a RUNNING trial that the next process on the study fails at once (its
owner's pid is gone) and re-runs with the same values, resuming the trial's run from its last
epoch; on other machines Optuna's heartbeat does the same after `heartbeat` x 2 seconds.

Objectives: by default the task's validation figure (`Task.val_metric`: val_accuracy, val_map,
knn_accuracy), best over the trial's epochs. `objective=accuracy,int8_latency_ms` makes the
study multi-objective: `int8_latency_ms` and `int8_kb` export each trial as an int8 TFLite file
and measure it here (batch 1, one LiteRT thread), and the study keeps the Pareto front. The
test split is never used to choose; it is reported for the chosen trials.

Early stopping: single-objective studies report the validation figure every epoch, and
Optuna's pruner (median or Hyperband) stops a bad trial by ending its fit early: the trial's
run still finishes (evaluated, recorded) with the epochs it had. Optuna cannot prune
multi-objective trials (its `Trial.report` refuses them), so those run to the end.

The folder holds `study.json` (what the study searches: recipe, space, objectives; a second
command with other settings is refused), `study.db`, one run per trial (`trial-0007/`),
`trials.csv`, `best.yaml` (the best trial's config as a recipe to train again; with several
objectives `pareto/trial-N.yaml` for each front trial), `search.json`, `report.md`/`.html`
with Optuna's plots, and `logs/` with every trial in TensorBoard's HParams tab.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import socket
import time
import warnings
from pathlib import Path


from tfkarpa import config as config_lib
from tfkarpa import runs, tasks
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks import search_space as space_lib

log = logging.getLogger(__name__)

# Figures of the int8 TFLite export, measured per trial; smaller is better.
EDGE = {"int8_latency_ms": "ms, batch 1, one LiteRT thread", "int8_kb": "KiB on disk"}
# Figures of the run itself; smaller is better.
RUN = {"fit_seconds": "seconds of model.fit", "params": "parameters of the delivered model"}
PRUNERS = ("median", "hyperband", "none")
SAMPLERS = ("tpe", "random")
SPEC = "study.json"


class TrialFailed(TfkarpaError):
    """A trial that could not train (its values break a rule, its loss diverged): recorded as
    FAIL and the study goes on. Any other error stops the study."""


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str  # as written: "accuracy", "int8_latency_ms"
    direction: str  # "maximize" | "minimize"
    kind: str  # "epoch" (a per-epoch figure), "edge" (int8 export), "run" (the run's record)

    def best(self, values: list[float]) -> float:
        return (max if self.direction == "maximize" else min)(values)


@dataclasses.dataclass
class Options:
    trials: int = 20  # finished (complete or pruned) trials the study stops at
    workers: int = 1  # processes on this machine sharing the study
    objective: str = ""  # comma list; '' = the task's validation figure
    pruner: str = "median"
    sampler: str = "tpe"
    storage: str = ""  # '' = sqlite:///<study>/study.db
    export_best: bool = False
    heartbeat: int = 30  # seconds between a running trial's heartbeats (other machines)
    latency_runs: int = 50
    verbose: int = 0  # Keras' progress for each trial's fit


def parse_objectives(text: str, task) -> list[Objective]:
    """`name[:max|min],...`; epoch figures may drop their `val_` (accuracy = val_accuracy)."""
    items = [t.strip() for t in (text or task.val_metric).split(",") if t.strip()]
    out = []
    for item in items:
        name, _, way = item.partition(":")
        if name.startswith("test_"):
            raise TfkarpaError(f"search option 'objective': '{name}' is measured on the test "
                               "split, which must not choose between trials; use its validation "
                               f"figure ('{name[5:]}')")
        kind = "edge" if name in EDGE else "run" if name in RUN else "epoch"
        default = "minimize" if kind != "epoch" or "loss" in name else "maximize"
        if way not in ("", "max", "min"):
            raise TfkarpaError(f"search option 'objective': '{item}': the direction after ':' "
                               "is max or min")
        direction = {"max": "maximize", "min": "minimize"}.get(way, default)
        out.append(Objective(name, direction, kind))
    if len({o.name for o in out}) != len(out):
        raise TfkarpaError(f"search option 'objective': '{text}' names a figure twice")
    return out


def check_options(options: Options) -> None:
    if options.trials < 1 or options.workers < 1 or options.heartbeat < 1:
        raise TfkarpaError("search options 'trials', 'workers' and 'heartbeat' must be positive")
    if options.pruner not in PRUNERS:
        raise TfkarpaError(f"search option 'pruner': '{options.pruner}' is not one of "
                           f"{', '.join(PRUNERS)}")
    if options.sampler not in SAMPLERS:
        raise TfkarpaError(f"search option 'sampler': '{options.sampler}' is not one of "
                           f"{', '.join(SAMPLERS)}")


@dataclasses.dataclass
class _Study:
    """What every worker of one study needs (picklable: `workers=N` hands it to processes)."""

    base: config_lib.Config
    params: list
    objectives: list
    folder: Path
    options: Options

    @property
    def name(self) -> str:
        return self.folder.resolve().name

    @property
    def storage_url(self) -> str:
        return self.options.storage or f"sqlite:///{(self.folder / 'study.db').resolve()}"


def run(base: config_lib.Config, space_file: str | Path, study_dir: str | Path,
        options: Options | None = None) -> dict:
    """Run (or go on with) the study in `study_dir`; returns {run_dir, artifacts, metrics}."""
    options = options or Options()
    check_options(options)
    task = tasks.get(base.task)
    params = space_lib.load(space_file, base, task.check_model)
    objectives = parse_objectives(options.objective, task)
    folder = Path(study_dir)
    runs.ensure_writable(folder, "study")
    if not (folder / SPEC).exists() and not (folder / "study.db").exists():
        runs.check_output_dir(folder, "search_study", "study")  # not a study: nobody's files
    study = _Study(base, params, objectives, folder, options)
    fresh = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _record_spec(study, space_file)
        optuna_study = _open(study, worker=0)
    except TfkarpaError:
        if fresh:  # a study that could not start leaves nothing behind
            shutil.rmtree(folder, ignore_errors=True)
        raise
    _recover_dead_trials(optuna_study)
    started = time.time()
    if options.workers == 1:
        _work(study, optuna_study)
    else:
        _work_in_processes(study, optuna_study)
    return _finish(study, _open(study, worker=0), time.time() - started)


# --------------------------------------------------------------------------- the study

def _record_spec(study: _Study, space_file) -> None:
    """study.json holds what the study searches. A study is one question: running the same
    folder with another recipe, space or objective would mix answers to different ones."""
    spec = {"task": study.base.task, "base": config_lib.to_dict(study.base),
            "space": [dataclasses.asdict(p) | {"where": None} for p in study.params],
            "objectives": [dataclasses.asdict(o) for o in study.objectives],
            "storage": study.options.storage or "sqlite (study.db)", "space_file": str(space_file)}
    spec = json.loads(json.dumps(spec))  # as read back: tuples become lists
    path = study.folder / SPEC
    known = runs.read_json(path)
    if known:
        differs = [k for k in ("task", "base", "space", "objectives") if known.get(k) != spec[k]]
        if differs:
            raise TfkarpaError(
                f"study '{study.folder}' was started with another {' and '.join(differs)} "
                f"(see {path}); use the same settings to go on with it, or another study= folder")
        return
    runs.atomic_write_json(path, spec)


def _open(study: _Study, worker: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # we log each trial ourselves

    engine = {"connect_args": {"timeout": 60}} if study.storage_url.startswith("sqlite") else {}
    try:
        storage = _storage(study, engine, _retry())
    except ImportError as err:  # the database's driver (Optuna wraps SQLAlchemy's error)
        missing = getattr(err.__cause__, "name", None) or getattr(err, "name", None) or "?"
        raise TfkarpaError(f"search option 'storage': '{study.storage_url}' needs the Python "
                           f"module '{missing}' (for PostgreSQL: pip install "
                           "'tfkarpa[postgres]')") from None
    except Exception as err:  # SQLAlchemy's errors: a bad URL, a database that does not answer
        text = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        if not study.options.storage:  # the study's own SQLite file: damaged, not misnamed
            raise TfkarpaError(f"study database '{study.folder / 'study.db'}' does not open "
                               f"({text}); restore it from a copy, or move it away to start "
                               "the study afresh") from None
        raise TfkarpaError(f"search option 'storage': cannot open '{study.storage_url}': "
                           f"{text}") from None
    return optuna.create_study(
        study_name=study.name, storage=storage, load_if_exists=True,
        directions=[o.direction for o in study.objectives],
        sampler=_sampler(study, worker), pruner=_pruner(study))


def _retry():
    """Optuna's callback that queues a failed trial again with its values and attributes (at
    most twice); used for stale heartbeats, dead local processes and Ctrl-C alike."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():  # marked experimental in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=2)


def _storage(study: _Study, engine: dict, retry):
    """Optuna's RDB storage. Processes that open a new database at the same moment race to
    create its tables (seen with two on one PostgreSQL database: a unique-key violation in the
    loser); the loser tries again once the winner's tables exist."""
    import optuna
    from optuna.storages import RDBStorage

    for attempt in range(3):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna 5
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(study.storage_url, engine_kwargs=engine,
                                  heartbeat_interval=study.options.heartbeat,
                                  grace_period=2 * study.options.heartbeat,
                                  heartbeat_stale_trial_callback=retry)
        except ImportError:
            raise
        except Exception:
            if attempt == 2:
                raise
            time.sleep(1 + attempt)


def _sampler(study: _Study, worker: int):
    """Seeded from the config's seed and this process: processes on one study with equal seeds
    draw the same first (random) trials (seen: two processes on one PostgreSQL study ran the
    same learning rates). Trial results are not bit-repeatable on a CPU anyway, so TPE's later
    choices would not repeat either."""
    import optuna

    seed = (study.base.seed * 1_000_003 + 7919 * worker + os.getpid()) % 2**31
    if study.options.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: a running trial counts as a poor result, so parallel workers spread out.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True,
                                      n_startup_trials=min(10, max(3, study.options.trials // 3)))


def _pruner(study: _Study):
    import optuna

    if study.options.pruner == "none" or len(study.objectives) > 1:
        return optuna.pruners.NopPruner()
    if study.options.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1,
                                              max_resource=study.base.epochs or "auto")
    # Judge a trial only from a third of its epochs on, once 5 trials have set the median:
    # with 3 trials and from the second epoch, 14 of 20 trials were pruned on shapes and the
    # best was the first one (early epochs' validation figures are noisy).
    return optuna.pruners.MedianPruner(n_startup_trials=5,
                                       n_warmup_steps=max(1, study.base.epochs // 3))


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _recover_dead_trials(study) -> None:
    """Fail RUNNING trials whose process on this machine is gone, and queue them again with
    the same values (Optuna's RetryHeartbeatStaleTrialCallback, as its own heartbeat check,
    `optuna.storages.fail_stale_trials`, does for other machines' trials that went silent)."""
    import optuna
    from optuna.trial import TrialState

    host = socket.gethostname()
    retry = _retry()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner_host, _, pid = str(trial.user_attrs.get("owner", "")).partition(":")
        if owner_host != host or not pid.isdigit() or runs.pid_alive(int(pid)):
            continue
        try:
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process got there first
        log.info("trial %d was cut short (its process %s is gone): running it again",
                 trial.number, pid)
        retry(study, study._storage.get_trial(trial._trial_id))


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _work(study: _Study, optuna_study) -> None:
    """Run trials in this process until the study has `trials` finished ones."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    left = study.options.trials - _finished(optuna_study)
    if left <= 0:
        log.info("study %s already has %d finished trials", study.name, _finished(optuna_study))
        return
    stop = MaxTrialsCallback(study.options.trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
    try:
        optuna_study.optimize(lambda trial: _trial(study, trial), n_trials=left,
                              callbacks=[stop, lambda s, t: _log_trial(study, s, t)],
                              catch=(TrialFailed,))
    except KeyboardInterrupt:
        _requeue_interrupted(optuna_study)
        raise


def _requeue_interrupted(study) -> None:
    """Ctrl-C: Optuna records the running trial as failed; queue it again at once, so the same
    command later re-runs it (resuming its run) as it does for a killed one."""
    from optuna.trial import TrialState

    retry = _retry()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if trial.user_attrs.get("interrupted") and trial.user_attrs.get("owner") == _owner():
            retry(study, trial)
            log.info("trial %d was interrupted: the same command runs it again", trial.number)


def _worker_main(study: _Study, worker: int, threads: int) -> None:
    """A `workers=N` process: its share of the CPU, then trials until the study is done."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [w{worker}] %(message)s",
                        datefmt="%H:%M:%S")
    import tfkarpa  # noqa: F401  (Keras 2 before TensorFlow)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    _work(study, _open(study, worker))


def _work_in_processes(study: _Study, optuna_study) -> None:
    """`workers` fresh processes (spawned: TensorFlow does not survive a fork) share the study
    through its database; this one waits and says how it goes."""
    threads = max(1, (os.cpu_count() or 1) // study.options.workers)
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_worker_main, args=(study, i + 1, threads))
             for i in range(study.options.workers)]
    for p in procs:
        p.start()
    log.info("search %s: %d worker processes, %d thread(s) each", study.name, len(procs), threads)
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        raise TfkarpaError(f"{len(failed)} of {len(procs)} search workers exited with an error "
                           f"(exit codes {failed}); their messages are above. Run the same "
                           "command again to go on with the study")


# --------------------------------------------------------------------------- one trial

def _label(trial) -> str:
    """A retried trial trains in its first attempt's run directory, so the run resumes (Optuna's
    retry copies the failed trial's user attributes, `run_dir` among them)."""
    if "run_dir" in trial.user_attrs:
        return Path(trial.user_attrs["run_dir"]).name
    return f"trial-{trial.number:04d}"


def _trial(study: _Study, trial):
    """Optuna's objective: one run with the drawn values; returns the objective values."""
    values = {p.key: p.suggest(trial) for p in study.params}
    label = _label(trial)
    trial.set_user_attr("owner", _owner())
    trial.set_user_attr("run_dir", str(study.folder / label))
    trial.set_user_attr("interrupted", False)  # a re-run copies its first attempt's attributes
    try:
        return _run_trial(study, trial, values, label)
    except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)
        raise


def _run_trial(study: _Study, trial, values: dict, label: str):
    import optuna

    try:
        cfg = space_lib.apply(study.base, values)
    except TfkarpaError as err:
        raise TrialFailed(f"{label}: {err}") from None
    cfg.name, cfg.run_dir, cfg.export = label, str(study.folder / label), False
    # The whole config goes into the study's database: best.yaml can be written by any process
    # on the study, also one on a machine that does not hold this trial's run.
    trial.set_user_attr("config", config_lib.to_dict(cfg))
    reporter = _epoch_reporter(trial, study.objectives[0], len(study.objectives) == 1)
    result = _train(cfg, reporter, study.options.verbose)
    figures = _figures(study, cfg, result)
    for key in ("epochs_run", "fit_seconds", "total_seconds", tasks.get(cfg.task).key_metric):
        if isinstance(result["metrics"].get(key), (int, float)):
            trial.set_user_attr(key, result["metrics"][key])
    for name, value in figures.items():
        trial.set_user_attr(name, value)
    if reporter.pruned_at:
        trial.set_user_attr("pruned_at_epoch", reporter.pruned_at)
        raise optuna.TrialPruned(f"stopped after epoch {reporter.pruned_at}")
    out = [figures[o.name] for o in study.objectives]
    return out[0] if len(out) == 1 else out


def _train(cfg: config_lib.Config, reporter, verbose: int) -> dict:
    """The trial's run; a run that finished before its process died is taken as it is."""
    import tensorflow as tf

    done = runs.read_json(Path(cfg.run_dir) / runs.DONE)
    if done:
        return {"run_dir": cfg.run_dir, "metrics": done.get("metrics", {}),
                "history": done.get("history", {})}
    try:
        result = tasks.run(cfg, verbose=verbose, callbacks=[reporter])
    except _ObjectiveMissing:
        raise
    except TfkarpaError as err:
        raise TrialFailed(f"{cfg.name}: {err}") from None
    finally:
        tf.keras.backend.clear_session()  # trials in one process must not pile up graphs
    done = runs.read_json(Path(result["run_dir"]) / runs.DONE)
    return {**result, "history": done.get("history", {})}


class _ObjectiveMissing(TfkarpaError):
    """The objective names a figure the runs do not log: stops the study."""


def _epoch_key(name: str, logged) -> str | None:
    for key in (name, f"val_{name}"):
        if key in logged:
            return key
    return None


def _epoch_reporter(trial, objective: Objective, report: bool):
    import tensorflow as tf

    class EpochReporter(tf.keras.callbacks.Callback):
        """Reports the objective's figure each epoch; ends the fit when the pruner says so."""

        pruned_at = 0

        def on_epoch_end(self, epoch, logs=None):
            if objective.kind != "epoch" or not report:
                return
            logs = logs or {}
            key = _epoch_key(objective.name, logs)
            if key is None:
                if epoch == 0:
                    raise _ObjectiveMissing(
                        f"search option 'objective': '{objective.name}' is not a figure the run "
                        f"logs each epoch (it logs {', '.join(sorted(logs))})")
                return  # a figure computed every few epochs (COCO mAP)
            trial.report(float(logs[key]), epoch)
            if trial.should_prune():
                self.pruned_at = epoch + 1
                self.model.stop_training = True

    return EpochReporter()


def _figures(study: _Study, cfg: config_lib.Config, result: dict) -> dict:
    """Every objective's value for the finished trial run."""
    out, hist = {}, result.get("history", {})
    for o in study.objectives:
        if o.kind == "epoch":
            key = _epoch_key(o.name, hist)
            if key is None:
                raise _ObjectiveMissing(f"search option 'objective': '{o.name}' is not in the "
                                        f"run's history (it has {', '.join(sorted(hist))})")
            values = [v for v in hist[key] if not math.isnan(v)]
            out[o.name] = o.best(values)
        elif o.kind == "run":
            out[o.name] = float(_run_figure(o.name, result))
    if any(o.kind == "edge" for o in study.objectives):
        out.update(_edge_figures(result["run_dir"], study.options.latency_runs))
    return out


def _run_figure(name: str, result: dict) -> float:
    if name == "params":
        manifest = runs.read_json(Path(result["run_dir"]) / "manifest.json")
        return manifest.get("model", {}).get("params", float("nan"))
    return result["metrics"].get(name, float("nan"))


def _edge_figures(run_dir: str, latency_runs: int) -> dict:
    """The trial as the edge device gets it: an int8 TFLite file (checked against the Keras
    model like any export), its size and its batch-1 latency on one LiteRT thread (one thread:
    steadier than two on a shared 2-core machine, and what a small device gives one model)."""
    from tfkarpa.core import benchmark as benchmark_lib

    exported = tasks.export_run(run_dir, ("tflite",), ("int8",), Path(run_dir) / "export",
                                representative=128, check=32)
    path = Path(exported["artifacts"]["tflite_int8"])
    predictor = tasks.load_predictor(path)
    timing = benchmark_lib.latency(predictor.timed(1), benchmark_lib.probe_image(
        predictor.image_size), latency_runs)
    return {"int8_latency_ms": timing["p50_ms"], "int8_kb": path.stat().st_size / 1024}


def _log_trial(study: _Study, optuna_study, trial) -> None:
    shown = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    if trial.values:
        got = ", ".join(f"{o.name} {_short(v)}" for o, v in zip(study.objectives, trial.values))
    elif "pruned_at_epoch" in trial.user_attrs:
        got = f"pruned after epoch {trial.user_attrs['pruned_at_epoch']}"
    else:
        got = trial.state.name.lower()
    seconds = trial.user_attrs.get("total_seconds")
    took = f" in {seconds:.0f}s" if isinstance(seconds, (int, float)) else ""
    log.info("search %s: trial %d (%d/%d finished) %s%s [%s]", study.name, trial.number,
             _finished(optuna_study), study.options.trials, got, took, shown)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- outputs

def _finish(study: _Study, optuna_study, seconds: float) -> dict:
    """Write what the study found: recipes, tables, HParams, report; export if asked."""
    from optuna.trial import TrialState

    trials = optuna_study.get_trials(deepcopy=False)
    count = {s.name.lower(): sum(t.state == s for t in trials) for s in
             (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise TfkarpaError(f"study '{study.folder}' has no completed trial yet "
                           f"({', '.join(f'{v} {k}' for k, v in count.items())}); see the "
                           "messages above")
    front = sorted(optuna_study.best_trials, key=lambda t: t.number)
    best = _best(study, front)
    artifacts = {"study": str(study.folder / SPEC), "storage": study.storage_url,
                 "trials_csv": str(_write_trials_csv(study, trials)),
                 "best_recipe": str(_write_recipe(study, best, study.folder / "best.yaml"))}
    if len(study.objectives) > 1:
        for t in front:
            _write_recipe(study, t, study.folder / "pareto" / f"{_run_name(t)}.yaml")
        artifacts["pareto_recipes"] = str(study.folder / "pareto")
    summary = _summary(study, trials, count, best, front, seconds)
    runs.atomic_write_json(study.folder / "search.json", summary)
    artifacts["summary"] = str(study.folder / "search.json")
    artifacts["tensorboard"] = str(_write_hparams(study, trials))
    from tfkarpa.tasks import search_report

    artifacts.update(search_report.write(study, optuna_study, summary))
    if study.options.export_best:
        artifacts.update(_export(study, front if len(study.objectives) > 1 else [best]))
    metrics = {"trials_complete": count["complete"], "trials_pruned": count["pruned"],
               "trials_failed": count["fail"], "best_trial": best.number,
               **{f"best_{o.name}": v for o, v in zip(study.objectives, best.values)},
               **({"pareto_trials": len(front)} if len(study.objectives) > 1 else {}),
               "search_seconds": round(seconds, 1)}
    return {"run_dir": str(study.folder), "artifacts": artifacts, "metrics": metrics}


def _best(study: _Study, front: list):
    """The single best trial; with several objectives, the front's best on the first."""
    first = study.objectives[0]
    return sorted(front, key=lambda t: t.values[0], reverse=first.direction == "maximize")[0]


def _run_name(trial) -> str:
    return Path(trial.user_attrs.get("run_dir", f"trial-{trial.number:04d}")).name


def _write_recipe(study: _Study, trial, path: Path) -> Path:
    """The trial's resolved config as a recipe: the run-placing keys back to their defaults."""
    stored = config_lib.build(base=trial.user_attrs["config"])  # ran here or on another machine
    fresh = config_lib.Config()
    for key in ("name", "run_dir", "runs_root", "export", "export_dir"):
        setattr(stored, key, getattr(fresh, key))
    figures = ", ".join(f"{o.name} {_short(v)}" for o, v in zip(study.objectives, trial.values))
    searched = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    header = (f"# Trial {trial.number} of study {study.name}: {figures}.\n"
              f"# Searched: {searched}.\n"
              f"# Train it again: python -m pipelines train {path}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    runs.atomic_write_text(path, header + config_lib.dump(stored))
    return path


def _write_trials_csv(study: _Study, trials) -> Path:
    keys = [p.key for p in study.params]
    skip = {"owner", "run_dir", "interrupted", "config", *(o.name for o in study.objectives)}
    attrs = sorted({k for t in trials for k in t.user_attrs if k not in skip})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["number", "state", *[o.name for o in study.objectives], *keys, *attrs,
                     "run_dir"])
    for t in trials:
        values = t.values or [None] * len(study.objectives)
        writer.writerow([t.number, t.state.name, *values, *[t.params.get(k) for k in keys],
                         *[t.user_attrs.get(k) for k in attrs], t.user_attrs.get("run_dir")])
    path = study.folder / "trials.csv"
    runs.atomic_write_text(path, buf.getvalue())
    return path


def _summary(study: _Study, trials, count: dict, best, front: list, seconds: float) -> dict:
    def row(t):
        return {"number": t.number, "run_dir": t.user_attrs.get("run_dir"),
                "params": t.params, "values": dict(zip([o.name for o in study.objectives],
                                                       t.values or [])),
                "user_attrs": {k: v for k, v in t.user_attrs.items()
                               if k not in ("owner", "config")}}

    return {"study": study.name, "task": study.base.task, "storage": study.storage_url,
            "objectives": [dataclasses.asdict(o) for o in study.objectives],
            "space": {p.key: p.describe() for p in study.params},
            "pruner": (study.options.pruner if len(study.objectives) == 1
                       else "none (multi-objective)"),
            "sampler": study.options.sampler, "trials": count,
            "best": row(best), "pareto_front": [row(t) for t in front],
            "this_command_seconds": round(seconds, 1)}


def _write_hparams(study: _Study, trials) -> Path:
    """`logs/`: the study as one HParams experiment, a session per finished trial with the
    searched values and the objective figures (TensorBoard's HParams tab)."""
    import tensorflow as tf
    from optuna.trial import TrialState
    from tensorboard.plugins.hparams import api as hp

    hparams = {p.key: hp.HParam(p.key, _domain(p)) for p in study.params}
    state = hp.HParam("state", hp.Discrete(["COMPLETE", "PRUNED"]))
    metrics = [hp.Metric(f"objective/{o.name}", display_name=o.name) for o in study.objectives]
    with runs.atomic_dir(study.folder / "logs", "search_logs", "study logs") as tmp:
        with tf.summary.create_file_writer(str(tmp)).as_default():
            hp.hparams_config(hparams=[*hparams.values(), state], metrics=metrics)
        for t in trials:
            if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
                continue
            with tf.summary.create_file_writer(str(tmp / _run_name(t))).as_default():
                values = {hparams[k]: _hparam_value(v) for k, v in t.params.items()}
                hp.hparams({**values, state: t.state.name}, trial_id=_run_name(t))
                shown = t.values or [t.intermediate_values[max(t.intermediate_values)]
                                     if t.intermediate_values else float("nan")]
                for o, v in zip(study.objectives, shown):
                    tf.summary.scalar(f"objective/{o.name}", v, step=0)
    return study.folder / "logs"


def _domain(param):
    from tensorboard.plugins.hparams import api as hp

    if param.kind == "choice":
        return hp.Discrete([_hparam_value(c) for c in param.choices])
    if param.kind == "int":
        return hp.IntInterval(int(param.low), int(param.high))
    return hp.RealInterval(float(param.low), float(param.high))


def _hparam_value(value):
    """HParams domains hold one type: numbers as floats, everything else as text."""
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return str(value)


def _export(study: _Study, chosen: list) -> dict:
    """SavedModel and the task's TFLite files for each chosen trial, under saved_models/."""
    out = {}
    target = Path("saved_models") / study.name
    for t in chosen:
        task = tasks.get(study.base.task)
        if not Path(t.user_attrs["run_dir"], "config.yaml").is_file():
            log.warning("trial %d ran on %s: export it there (its run is not on this machine)",
                        t.number, t.user_attrs.get("owner", "another machine").split(":")[0])
            continue
        exported = tasks.export_run(t.user_attrs["run_dir"], ("saved_model", "tflite"),
                                    task.default_quantize, target)
        for key, path in exported["artifacts"].items():
            out[f"{_run_name(t)}_{key}"] = path
    return out


def is_study(path: str | Path) -> bool:
    return (Path(path) / SPEC).is_file()


def refresh(study_dir: str | Path) -> dict:
    """Write a study's recipes, tables, HParams and report again from its database (`report
    STUDY`), e.g. while other processes are still adding trials."""
    folder = Path(study_dir)
    spec, before = runs.read_json(folder / SPEC), runs.read_json(folder / "search.json")
    if not spec:
        raise TfkarpaError(f"'{folder}' is not a study folder (no {SPEC})")
    params = [space_lib.Param(**{**p, "choices": tuple(p["choices"]), "where": ""})
              for p in spec["space"]]
    storage = spec["storage"] if "://" in spec["storage"] else ""
    options = Options(storage=storage, pruner=before.get("pruner", "median"),
                      sampler=before.get("sampler", "tpe"))
    study = _Study(config_lib.build(base=spec["base"]), params,
                   [Objective(**o) for o in spec["objectives"]], folder, options)
    return _finish(study, _open(study, worker=0), 0.0)


def base_config(cfg: config_lib.Config) -> config_lib.Config:
    """A copy of `cfg` as the study's base: the placing keys are each trial's own."""
    base = copy.deepcopy(cfg)
    base.name, base.run_dir, base.export_dir = "", "", ""
    return base

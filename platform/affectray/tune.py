"""Hyperparameter sweeps over fine-tuning with Ray Tune, Optuna (TPE) and ASHA.

    python jobs/tune.py --config jobs/configs/tune-smoke.yaml
    affectray tune --config jobs/configs/tune-smoke.yaml            # again after a crash: add --resume

The YAML names a base fine-tuning config and declares the search space next to
it, in the dotted keys of that config::

    base: jobs/configs/finetune-smoke.yaml
    space:
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      optim.weight_decay: {uniform: [0.0, 0.1]}
      train.batch_size: {int: [16, 64]}
      model.backbone: {choice: [test_resnet, test_efficientnet]}

Each trial is an ordinary fine-tuning run (``run_finetune``, the same loop and
checkpoints) whose per-epoch validation reaches Tune through Ray Train's
TuneReportCallback; ASHA stops weak trials at epoch boundaries. The sweep
lives at ``<search.storage>/<name>`` (local or s3://): ``--resume`` restores
it with ``Tuner.restore`` (finished trials kept, unfinished ones continue from
their own latest checkpoint, none counted twice); ``search.study_storage``
persists the Optuna study too (``sqlite:///path.db`` or an RDB URL).

At the end: ``best_config.yaml`` (a finetune config that ``jobs/finetune.py
--config`` takes as it is), ``results.csv`` and ``trials.png`` beside the
sweep, and a JSON summary line with ``trials``, ``best_metric``,
``best_config`` and ``best_checkpoint``.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from affectray import storage
from affectray.config import ConfigError, config_to_dict, location
from affectray.errors import JobError

logger = logging.getLogger("affectray.tune")

__all__ = ["SearchConfig", "TuneConfig", "run_tune", "search_space"]

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")


@dataclass
class SearchConfig:
    name: str = "sweep"
    storage: str = location("runs/sweeps")  # local dir or s3:// prefix; the sweep lives at <storage>/<name>
    num_samples: int = 8
    max_concurrent_trials: int = 2
    metric: str = "val_f1_macro"  # any validation metric the finetune loop reports
    mode: Literal["max", "min"] = "max"
    seed: int = 0
    # ASHA: trials may stop after grace_period epochs; every rung keeps the best 1/reduction_factor.
    grace_period: int = 1
    reduction_factor: int = 2
    study_storage: str | None = None  # Optuna storage URL (sqlite:///sweep.db, postgresql://...); null = in memory
    # Resources of each trial's driver (the Tune function); its Ray Train workers ask for their own.
    trial_cpus: float = 0.25
    max_failures: int = 0  # retries of an errored trial


@dataclass
class TuneConfig:
    base: str = location("", shipped=True)  # a finetune config YAML (path or URI); required
    overrides: list[str] = field(default_factory=list)  # dotted overrides on the base, before the space
    space: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self) -> None:
        if not self.base:
            raise ConfigError("base: a finetune config to sweep over is required")
        if not self.space:
            raise ConfigError("space: declare at least one parameter, e.g. optim.lr: {loguniform: [1.0e-4, 1.0e-2]}")


def search_space(space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """The YAML space as Tune sampling domains, checked key by key."""
    from ray import tune

    domains = {}
    for key, spec in space.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"space.{key}: give exactly one of {DISTRIBUTIONS}, e.g. {{loguniform: [1e-4, 1e-2]}}")
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise ConfigError(f"space.{key}.choice: a non-empty list of values")
            domains[key] = tune.choice(args)
            continue
        if not isinstance(args, list) or len(args) != 2 or not all(isinstance(a, (int, float)) for a in args):
            raise ConfigError(f"space.{key}.{kind}: two numbers [low, high]")
        low, high = args
        if not low < high or (kind == "loguniform" and low <= 0):
            raise ConfigError(f"space.{key}.{kind}: need 0 < low < high for loguniform, low < high otherwise")
        if kind == "int":
            domains[key] = tune.randint(int(low), int(high) + 1)  # both ends included
        else:
            domains[key] = (tune.loguniform if kind == "loguniform" else tune.uniform)(float(low), float(high))
    return domains


def base_config(config: TuneConfig):
    """The finetune config every trial starts from: the base YAML and the overrides, read once on
    the driver with its local paths made absolute (trials run in directories of their own)."""
    from affectray.config import load_config, resolve_locations
    from affectray.train.finetune import FinetuneConfig

    return resolve_locations(load_config(FinetuneConfig, config.base, config.overrides))


def trial_config(base: Any, params: dict[str, Any]):
    """The finetune config of one trial: the base config (or its plain dict) with the sampled values."""
    from affectray.config import config_from_dict, update_config
    from affectray.train.finetune import FinetuneConfig

    if isinstance(base, dict):
        base = config_from_dict(FinetuneConfig, base)
    # Samplers may hand numpy scalars; the config checks plain Python types.
    return update_config(base, {key: getattr(value, "item", lambda v=value: v)() for key, value in params.items()})


def _trainable(params: dict[str, Any]) -> None:
    """One trial: an ordinary fine-tuning run, its reports forwarded to Tune."""
    import dataclasses

    import ray.tune

    from affectray.train.finetune import run_finetune

    setup = params.pop("__affectray__")
    config = trial_config(setup["base"], params)
    trial_id = ray.tune.get_context().get_trial_id()
    # A stable run per trial: a trial resumed after a crash continues its own Ray Train run.
    run = dataclasses.replace(config.run, name=f"trial-{trial_id}", storage=setup["trials_storage"])
    config = dataclasses.replace(config, run=run)
    run_finetune(config, callbacks=[_validation_reports(setup["metric"])])


def _validation_reports(metric: str):
    """Ray Train's TuneReportCallback, forwarding only the reports that carry validation metrics.

    The loop also reports training loss between validations; passing those on would
    count as ASHA iterations and give Tune results without the metric.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValidationReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ValidationReportCallback()


def _searcher(config: TuneConfig):
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    search = config.search
    optuna_storage = None
    if search.study_storage:
        import optuna

        optuna_storage = optuna.storages.RDBStorage(search.study_storage)
    import optuna

    searcher = OptunaSearch(
        metric=search.metric,
        mode=search.mode,
        sampler=optuna.samplers.TPESampler(seed=search.seed),
        study_name=search.name,
        storage=optuna_storage,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent_trials)


def run_tune(config: TuneConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or with ``resume``, restore and finish) the sweep; returns the job summary."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    start = time.perf_counter()
    search = config.search
    sweep_uri = storage.join(search.storage, search.name)
    base = base_config(config)  # a bad base fails here, not in every trial
    domains = search_space(config.space)
    for key in domains:  # every key must be a setting of the finetune config
        trial_config(base, {key: _probe_value(config.space[key])})
    fs, path = storage.pyarrow_filesystem(search.storage)
    setup = {
        "base": config_to_dict(base),
        "trials_storage": storage.join(sweep_uri, "trials"),
        "metric": search.metric,
    }
    trainable = ray.tune.with_resources(_trainable, {"cpu": search.trial_cpus})
    param_space = {**domains, "__affectray__": setup}
    experiment_path = f"{path.rstrip('/')}/{search.name}"
    if resume:
        if not ray.tune.Tuner.can_restore(experiment_path, storage_filesystem=fs):
            raise JobError(f"no sweep to resume at {sweep_uri!r}: run without --resume to start it")
        tuner = ray.tune.Tuner.restore(
            experiment_path, trainable, resume_unfinished=True, resume_errored=False,
            param_space=param_space, storage_filesystem=fs,
        )  # fmt: skip
    else:
        if ray.tune.Tuner.can_restore(experiment_path, storage_filesystem=fs):
            raise JobError(
                f"a sweep already exists at {sweep_uri!r}: resume it with --resume, or pick a new search.name"
            )
        tuner = ray.tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=ray.tune.TuneConfig(
                search_alg=_searcher(config),
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=max(1, base.train.epochs),
                    grace_period=search.grace_period,
                    reduction_factor=search.reduction_factor,
                ),
                metric=search.metric,
                mode=search.mode,
                num_samples=search.num_samples,
                max_concurrent_trials=search.max_concurrent_trials,
            ),
            run_config=ray.tune.RunConfig(
                name=search.name,
                storage_path=path,
                storage_filesystem=fs,
                failure_config=ray.tune.FailureConfig(max_failures=search.max_failures),
            ),
        )
    results = tuner.fit()
    return summarise(config, results, sweep_uri, start)


def _probe_value(spec: dict[str, list[Any]]) -> Any:
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return args[0]
    return int(args[0]) if kind == "int" else float(args[0])


def summarise(config: TuneConfig, results, sweep_uri: str, start: float) -> dict[str, Any]:
    """Best config YAML, results table, trials plot and the JSON summary of a finished sweep."""
    from affectray.config import dump_config
    from affectray.report import trials_plot
    from affectray.train.loop import BEST_CHECKPOINT_DIR

    search = config.search
    errored = [r for r in results if r.error is not None]
    finished = [r for r in results if r.error is None and r.metrics and search.metric in r.metrics]
    if not finished:
        reasons = "; ".join(_error_line(r.error) for r in errored[:3])
        raise JobError(
            f"no trial of {sweep_uri!r} finished with {search.metric!r}" + (f": {reasons}" if reasons else "")
        )
    best = results.get_best_result(metric=search.metric, mode=search.mode, scope="all", filter_nan_and_inf=True)
    best_params = {k: v for k, v in best.config.items() if k != "__affectray__"}
    best_value = _best_value(best, search.metric, search.mode)
    best_config = trial_config(base_config(config), best_params)
    best_config_uri = storage.join(sweep_uri, "best_config.yaml")
    storage.write_text(
        best_config_uri,
        f"# Best of {len(results)} trials of sweep {search.name!r}: {search.metric} = {best_value:.4f}\n"
        f"# parameters: {best_params}\n" + dump_config(best_config),
    )
    trial_id = best.metrics.get("trial_id")
    best_checkpoint = storage.join(sweep_uri, "trials", f"trial-{trial_id}", BEST_CHECKPOINT_DIR)
    results_csv = storage.join(sweep_uri, "results.csv")
    storage.write_text(results_csv, _results_table(results, search.metric, search.mode).to_csv(index=False))
    values = [
        (
            str(r.metrics.get("trial_id")),
            _best_value(r, search.metric, search.mode),
            r.metrics.get("training_iteration", 0),
        )
        for r in finished
    ]
    plot = trials_plot(values, storage.join(sweep_uri, "trials.png"), metric=search.metric, title=search.name)
    return {
        "job": "tune",
        "sweep": sweep_uri,
        "trials": len(results),
        "finished": len(finished),
        "errored": len(errored),
        "errors": [_error_line(r.error) for r in errored],
        "metric": search.metric,
        "best_metric": best_value,
        "best_params": best_params,
        "best_config": best_config_uri,
        "best_checkpoint": best_checkpoint,
        "results_csv": results_csv,
        "trials_png": plot,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _trial_id(result) -> str:
    """A trial's id: from its metrics, else from its directory (``_trainable_<id>_<n>_...``)."""
    import re

    if result.metrics and result.metrics.get("trial_id"):
        return str(result.metrics["trial_id"])
    match = re.search(r"_([0-9a-f]{5,})_\d+", str(result.path).rstrip("/").rsplit("/", 1)[-1])
    return match.group(1) if match else ""


def _results_table(results, metric: str, mode: str):
    """One row per trial, errored ones included: status, parameters, best and last metric, epochs, error."""
    import pandas as pd

    rows = []
    for r in results:
        ok = r.error is None and bool(r.metrics) and metric in r.metrics
        rows.append({
            "trial_id": _trial_id(r),
            "status": "errored" if r.error is not None else ("finished" if ok else "no result"),
            **{k: v for k, v in (r.config or {}).items() if k != "__affectray__"},
            f"best_{metric}": _best_value(r, metric, mode) if ok else None,
            f"last_{metric}": r.metrics.get(metric) if ok else None,
            "epochs": (r.metrics or {}).get("training_iteration", 0),
            "error": _error_line(r.error) if r.error is not None else "",
        })  # fmt: skip
    return pd.DataFrame(rows)


def _error_line(error: BaseException) -> str:
    """The line of a trial's (Ray-wrapped) error that says what went wrong: its last one."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def _best_value(result, metric: str, mode: str) -> float:
    """A trial's best value of the metric over its epochs (the best checkpoint's score)."""
    history = result.metrics_dataframe
    if history is not None and metric in history:
        values = [v for v in history[metric].tolist() if isinstance(v, (int, float)) and math.isfinite(v)]
        if values:
            return float(max(values) if mode == "max" else min(values))
    return float(result.metrics[metric])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from affectray.runtime import add_config_job_arguments

    add_config_job_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="restore the interrupted sweep and finish it")


def main(args: argparse.Namespace) -> dict[str, Any]:
    from affectray.runtime import run_config_job

    return run_config_job(TuneConfig, args, lambda config: run_tune(config, resume=args.resume))

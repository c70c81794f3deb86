"""Connecting to Ray and reporting a job's result, the same way for every job."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Callable

logger = logging.getLogger("affectray")

# Ray Train workers each hold a CPU slot and Ray Data tasks need slots as well;
# on a 2-core laptop that deadlocks unless the local instance advertises more
# logical CPUs than cores (DESIGN.md, "Ray on a small machine").
MIN_LOCAL_CPUS = 8


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to the cluster if there is one, else start a local Ray sized for the pipelines.

    ``address`` (or RAY_ADDRESS, which ``ray job submit`` sets for the driver)
    joins an existing cluster; otherwise a local instance starts with at least
    MIN_LOCAL_CPUS logical CPUs and no dashboard.
    """
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        cpus = num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1)
        ray.init(num_cpus=cpus, include_dashboard=False)
    return ray


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, not a bug: reported in one line, no traceback."""
    from affectray.config import ConfigError
    from affectray.data.annotations import AnnotationError
    from affectray.data.sources import SourceError
    from affectray.labels import LabelError
    from affectray.storage import StorageError
    from affectray.train.checkpoint import CheckpointError

    return (ConfigError, AnnotationError, SourceError, LabelError, StorageError, CheckpointError, JobError)


class JobError(Exception):
    """A job that cannot run as asked (nothing to read, contradictory settings)."""


def run_job(main: Callable[[Any], dict[str, Any]], args: Any) -> int:
    """Run a job's main, print its JSON summary last; user errors exit 2 with one clear line."""
    try:
        summary = main(args)
    except user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    emit_summary(summary)
    return 0


def emit_summary(summary: dict[str, Any]) -> None:
    """Print the job's one-line JSON summary; by contract it is the last line on stdout."""
    sys.stdout.flush()
    # A progress bar may have left stderr mid-line (carriage returns, cursor codes); where
    # both streams reach one log (ray job logs), end that line so the summary has its own.
    print(file=sys.stderr, flush=True)
    print(json.dumps(summary, sort_keys=True, default=str), flush=True)


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def add_config_job_arguments(parser) -> None:
    """The arguments of every config-driven job: --config, --set and --address."""
    from affectray.config import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a new local Ray)")


def run_config_job(config_cls, args, run: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """Resolve the job's config from --config/--set, print it, connect to Ray, run it."""
    from affectray.config import config_from_args, print_config

    config = config_from_args(config_cls, args)
    print_config(config)
    init_ray(args.address)
    return run(config)

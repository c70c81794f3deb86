"""Connecting to Ray and reporting a job's result, the same way for every job."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from affectray.errors import AffectrayError, JobError

logger = logging.getLogger("affectray")

# Ray Train workers each hold a CPU slot and Ray Data tasks need slots as well;
# on a 2-core laptop that deadlocks unless the local instance advertises more
# logical CPUs than cores (DESIGN.md, "Ray on a small machine").
MIN_LOCAL_CPUS = 8

# Without a dashboard the local Ray has no State API, and Ray Train's placement-group cleaner asks
# it every ~2 s whether the run's controller lives, logging this warning each time it cannot:
# ~3,000 lines in an hour's fine-tune. The local Ray's workers drop that warning, and only it.
STATE_API_WARNING = "Failed to query Ray Train Controller actor state"
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to the cluster if there is one, else start a local Ray sized for the pipelines.

    ``address`` (or RAY_ADDRESS, which ``ray job submit`` sets for the driver)
    joins an existing cluster; otherwise a local instance of this process's own
    starts, with at least MIN_LOCAL_CPUS logical CPUs, no dashboard, and every
    port on the loopback interface (``_loopback_only``).
    """
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        cpus = num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1)
        # address="local": without it Ray joins a `ray start` instance of this machine, which
        # refuses num_cpus; the platform's promise is a local Ray of its own.
        with _loopback_only():
            ray.init(
                address="local", num_cpus=cpus, include_dashboard=False,
                runtime_env={"worker_process_setup_hook": "affectray.runtime.drop_state_api_warnings"},
            )  # fmt: skip
    return ray


def drop_state_api_warnings() -> None:
    """Every local Ray worker runs this first: the cleaner's State API warning is dropped (see above)."""
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).addFilter(
        lambda record: not record.getMessage().startswith(STATE_API_WARNING)
    )


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Inside: a Ray started here takes 127.0.0.1 as its node address, so it listens on loopback alone.

    Ray binds GCS, raylet, object manager, core workers, agents and both Prometheus
    endpoints to every interface unless the node address is a loopback one, and
    ``ray.init(_node_ip_address="127.0.0.1")`` swaps that for the machine's address.
    Ray's own switch for machines that host no cluster (``ENABLE_RAY_CLUSTER``, off on macOS
    and Windows, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER) picks loopback; it is read when the node
    starts, and restored after, so a later ``ray.init(address=...)`` in this process reports
    its real address to a cluster. tests/test_bad_inputs.py checks every listening socket.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def check_writable(uri: str) -> None:
    """Refuse, in one line and before Ray starts, an output location the job could not write.

    Local: the nearest folder of ``uri`` that exists must take a new file (a nameless
    temporary file is made there and vanishes: nothing is left behind, not even ``uri``).
    S3: an empty probe object is written and removed, so a missing bucket or a read-only
    credential is named now, not by a Ray task after the work is done.
    """
    from affectray import storage

    if storage.is_remote(uri):
        probe = storage.join(uri, f".affectray-write-check-{uuid.uuid4().hex}")
        try:
            storage.write_bytes(probe, b"")
            storage.remove(probe)
        except storage.StorageError as error:
            raise JobError(f"cannot write the output to {uri!r}: {error}") from None
        return
    path = Path(urlparse(uri).path if uri.startswith("file://") else uri).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
    if not existing.is_dir():
        raise JobError(f"cannot write the output to {uri!r}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise JobError(f"cannot write the output to {uri!r}: {existing}: {error.strerror or error}") from None


def run_job(main: Callable[[Any], dict[str, Any] | None], args: Any) -> int:
    """Run a job's main, print its JSON summary last; user errors exit 2 with one clear line.

    A main that prints its own summary (the demo ends on a table for people) returns None.
    """
    try:
        summary = main(args)
    except AffectrayError as error:  # bad input, not a bug: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    if summary is not None:
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


# Attributes add_config_job_arguments puts on args: never config fields, even where a config
# has a field of that name (TuneConfig.overrides).
_JOB_ARGUMENTS = frozenset({"config", "overrides", "address"})


def job_config(config_cls, args):
    """The job's config: field defaults < --config YAML < --set < flags; local paths made absolute.

    A flag is shorthand for one field: an attribute of ``args`` named after a field of
    ``config_cls``. Jobs declare flags with ``dest=<field>`` and ``default=argparse.SUPPRESS``,
    so a flag left out leaves the YAML's value alone.
    """
    from affectray.config import ConfigError, config_from_dict, load_config, resolve_locations

    # Read as a plain mapping first: a required field (SOURCE, OUT) may still come from a flag.
    data = load_config(dict, getattr(args, "config", None), getattr(args, "overrides", None) or ())
    fields = [f for f in dataclasses.fields(config_cls) if f.init]
    flags = {f.name: getattr(args, f.name) for f in fields if f.name not in _JOB_ARGUMENTS and hasattr(args, f.name)}
    data.update(flags)
    for f in fields:
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(
                f"missing required value: {f.name} (give it on the command line, as {f.name}: in --config, "
                f"or with --set {f.name}=...)"
            )
    return resolve_locations(config_from_dict(config_cls, data))


def run_config_job(
    config_cls, args, run: Callable[[Any], dict[str, Any]], connect_first: bool = True
) -> dict[str, Any]:
    """Resolve the job's config (``job_config``), print it, connect to Ray, run it.

    ``connect_first=False`` leaves connecting to ``run``, which checks its inputs before
    starting Ray so that a bad one fails in a second; --address still connects first.
    """
    from affectray.config import print_config

    config = job_config(config_cls, args)
    print_config(config)
    if connect_first or args.address:
        init_ray(args.address)
    return run(config)

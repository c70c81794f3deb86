"""README commands are tests: the smoke commands run verbatim, as a user types them.

From the repository root of a copy of the checkout (every file `git ls-files` lists,
uncommitted new ones included), with the venv's `python`, `ray` and `affectray` first on
PATH (as after `source .venv/bin/activate`):

- `python jobs/pretrain.py --config jobs/configs/pretrain-smoke.yaml` (builds the sample
  shards into demo-output/shards/sample: the one ingested corpus every later command reads),
  the finetune smoke command the same way, each on a local Ray of its own;
- the tune smoke command, killed (driver and its Ray) once a trial has finished, as a crash
  would, then its `--resume` command, which must end with exactly num_samples trials;
- `affectray synth sample/` and `affectray label` on its videos with the fine-tuned checkpoint;
- `affectray predict` on one of its videos with the built-in model (no Ray);
- `ray job submit --working-dir . -- python jobs/pretrain.py ...` against a
  single-node `ray start --head` with token auth, whose relative data and output locations
  resolve under $AFFECTRAY_HOME (set on the head), so what the job writes outlives Ray's
  temporary package.

Each test checks the exit code, that the JSON summary's paths are absolute, and that every
output it names exists after the process has ended and lies outside Ray's packages.
Commands run in file order; one fixture per command, so a failure names its command.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import REPO_ROOT, _free_port

from affectray.runtime import STATE_API_WARNING

pytestmark = pytest.mark.slow

VENV_BIN = REPO_ROOT / ".venv" / "bin"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# Verbatim from README.md: test_the_commands_are_the_readmes checks each one is there.
PRETRAIN = "python jobs/pretrain.py --config jobs/configs/pretrain-smoke.yaml"
FINETUNE = "python jobs/finetune.py --config jobs/configs/finetune-smoke.yaml"
TUNE = "python jobs/tune.py --config jobs/configs/tune-smoke.yaml"
TUNE_RESUME = "python jobs/tune.py --config jobs/configs/tune-smoke.yaml --resume"
SUBMIT_PRETRAIN = "ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/pretrain-smoke.yaml"
SUBMIT_FINETUNE = "ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/finetune-smoke.yaml"
# README "Label a corpus": the sample corpus's videos, labelled with the fine-tune smoke run's checkpoint.
SYNTH = "affectray synth sample/"
LABEL = "affectray label sample/videos demo-output/labels --checkpoint demo-output/runs/finetune-smoke/best_checkpoint"
# README "Real faces": the built-in model on a sample video, no Ray.
PREDICT = "affectray predict sample/videos/astronaut_000.mp4 --out predictions/ --json"

# Summary keys that name an output (besides any value that is an absolute local path).
OUTPUT_KEYS = {"checkpoint", "best_checkpoint", "best_config", "manifest", "out", "report", "run", "sweep"}
OUTPUT_SUFFIXES = ("_png", "_csv", "_parquet", "_json", "_html", "_yaml", "_checkpoint", "_manifest", "_dir", "_path")
# Where `ray job submit --working-dir` unpacks the job's code: nothing may be written there.
RAY_PACKAGE_PARTS = ("runtime_resources", "working_dir_files")

TIMES: dict[str, float] = {}


@dataclass
class Run:
    command: str
    returncode: int
    output: str  # stdout and stderr together
    seconds: float
    summary: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def tail(self, n: int = 3000) -> str:
        return self.output[-n:]


def _summary(output: str) -> dict[str, Any] | None:
    """The job's one-line JSON summary: the last line (ANSI codes stripped) that is a JSON object.

    Under `ray job submit`, a progress bar's cursor codes may sit in front of it on its line.
    """
    for line in reversed([ANSI_ESCAPE.sub("", raw).strip() for raw in output.splitlines()]):
        start = line.find('{"')
        if start < 0:
            continue
        try:
            value = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and "job" in value:
            return value
    return None


def _env(**extra: str) -> dict[str, str]:
    """The user's shell after `source .venv/bin/activate`, with no Ray settings of the test session."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTEST_CURRENT_TEST"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    env.pop("PYTHONHOME", None)
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0", **extra)
    return env


# Ray gives a new node 30 s (hard-coded) to register; on 2 cores shared with other work it
# sometimes needs longer. That is the machine, not the command: such a start is tried again.
RAY_START_TIMEOUT = "The current node timed out during startup"


def _run(name: str, command: str, cwd: Path, env: dict[str, str], timeout: float = 1200) -> Run:
    run = _run_once(name, command, cwd, env, timeout)
    if run.returncode != 0 and RAY_START_TIMEOUT in run.output:
        print(f"\n[readme] {command}: Ray's node start timed out (busy machine); running it again")
        retry = _run_once(name, command, cwd, env, timeout)
        retry.output = f"{run.output}\n[test] Ray's node start timed out; ran again:\n{retry.output}"
        return retry
    return run


def _run_once(name: str, command: str, cwd: Path, env: dict[str, str], timeout: float) -> Run:
    start = time.monotonic()
    proc = subprocess.Popen(
        shlex.split(command),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        output += f"\n[test] killed after {timeout} s"
    seconds = time.monotonic() - start
    TIMES[name] = seconds
    summary = _summary(output)
    print(f"\n[readme] {command}: exit {proc.returncode}, {seconds:.1f} s; summary: {json.dumps(summary)}")
    return Run(command=command, returncode=proc.returncode, output=output, seconds=seconds, summary=summary)


def _output_paths(summary: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(key, value) of every string in the summary that names an output or is a local path."""
    if isinstance(summary, dict):
        for k, v in summary.items():
            yield from _output_paths(v, k)
    elif isinstance(summary, list):
        for v in summary:
            yield from _output_paths(v, key)
    elif isinstance(summary, str):
        names_output = key in OUTPUT_KEYS or key.endswith(OUTPUT_SUFFIXES)
        if names_output or summary.startswith(("/", "file://")):
            yield key, summary


def check_run(run: Run, *expected_keys: str) -> dict[str, Any]:
    """Exit 0, a summary, absolute existing output paths outside any Ray package; returns the summary."""
    assert run.returncode == 0, f"`{run.command}` exited {run.returncode}:\n{run.tail()}"
    assert run.summary is not None, f"`{run.command}` printed no JSON summary:\n{run.tail()}"
    summary = run.summary
    for key in expected_keys:
        assert summary.get(key), f"`{run.command}`: the summary has no {key!r}: {summary}"
    paths = list(_output_paths(summary))
    for key, value in paths:
        if "://" in value and not value.startswith("file://"):
            continue  # s3://…: not on this disk
        local = value.removeprefix("file://")
        assert os.path.isabs(local), f"`{run.command}`: summary {key!r} is not absolute: {value!r}"
        assert os.path.exists(local), (
            f"`{run.command}`: summary {key!r} names {value!r}, which does not exist after the job"
        )
        parts = Path(local).parts
        assert not any(p in RAY_PACKAGE_PARTS or p.startswith("_ray_pkg_") for p in parts), (
            f"`{run.command}`: summary {key!r} lies in Ray's temporary package: {value!r}"
        )
    return summary


# ---------------------------------------------------------------------------
# The checkout's copy, and the commands in order
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Iterator[Path]:
    """A copy of the checkout's files (tracked and untracked-but-not-ignored): no outputs, no venv."""
    listed = (
        subprocess.run(
            ["git", "-C", str(REPO_ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    root = tmp_path_factory.mktemp("checkout")
    for rel in filter(None, listed):
        source = REPO_ROOT / rel
        if not source.is_file() and not source.is_symlink():
            continue  # deleted in the working tree, still in the index
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    yield root
    print("\n[readme] wall times: " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMES.items()))


@pytest.fixture(scope="module")
def pretrain_run(checkout) -> Run:
    return _run("pretrain", PRETRAIN, checkout, _env())


@pytest.fixture(scope="module")
def finetune_run(checkout, pretrain_run) -> Run:
    return _run("finetune", FINETUNE, checkout, _env())


def _terminated_trials(sweep_dir: Path) -> int:
    """Trials the sweep's experiment state on disk records as finished."""
    count = 0
    for state in sweep_dir.glob("experiment_state-*.json"):
        try:
            data = json.loads(state.read_text())
        except (json.JSONDecodeError, OSError):
            continue  # being rewritten
        # Each trial is a list whose first item is the trial's own JSON document.
        statuses = [json.loads(trial[0]).get("status") for trial in data.get("trial_data", [])]
        count = max(count, statuses.count("TERMINATED"))
    return count


@dataclass
class KilledSweep:
    killed: Run  # TUNE, killed (its driver and its own Ray together) once one trial had finished
    finished_before: int
    resumed: Run  # TUNE_RESUME, which finishes it


@pytest.fixture(scope="module")
def tune_run(checkout, pretrain_run) -> KilledSweep:
    """The README's sweep, interrupted as a crash would, then the README's --resume command."""
    sweep_dir = checkout / "demo-output" / "sweeps" / "tune-smoke"
    log = checkout.parent / "tune-killed.log"
    start = time.monotonic()
    # Output to a file, not a pipe: nobody reads a pipe while this waits, and a full one blocks
    # the driver's next write (seen: the sweep stalled mid-trial).
    with log.open("w") as out:
        proc = subprocess.Popen(
            shlex.split(TUNE), cwd=checkout, env=_env(), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            while _terminated_trials(sweep_dir) < 1 and proc.poll() is None and time.monotonic() - start < 900:
                time.sleep(1)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
            proc.wait()
    output = log.read_text(errors="replace")
    TIMES["tune (killed)"] = time.monotonic() - start
    killed = Run(command=TUNE, returncode=proc.returncode, output=output, seconds=TIMES["tune (killed)"])
    return KilledSweep(killed, _terminated_trials(sweep_dir), _run("tune resume", TUNE_RESUME, checkout, _env()))


@pytest.fixture(scope="module")
def label_run(checkout, finetune_run) -> Run:
    synth = _run("synth", SYNTH, checkout, _env())
    assert synth.returncode == 0, f"`{SYNTH}` exited {synth.returncode}:\n{synth.tail()}"
    return _run("label", LABEL, checkout, _env())


@pytest.fixture(scope="module")
def predict_run(checkout, label_run) -> Run:
    return _run("predict", PREDICT, checkout, _env())


# SUBMIT_FINETUNE is checked as text only (it cost 2 minutes of the suite's budget): it is
# SUBMIT_PRETRAIN's path (the package, AFFECTRAY_HOME) with FINETUNE's job, both run here.
@pytest.mark.parametrize(
    "command", [PRETRAIN, FINETUNE, TUNE, TUNE_RESUME, SUBMIT_PRETRAIN, SUBMIT_FINETUNE, SYNTH, LABEL, PREDICT]
)
def test_the_commands_are_the_readmes(command):
    """What runs here is what the README tells users to type, character for character."""
    readme_lines = {line.split("#")[0].strip() for line in (REPO_ROOT / "README.md").read_text().splitlines()}
    assert command in readme_lines, f"README.md no longer shows `{command}`: update the README or this test"


def test_pretrain_smoke(pretrain_run, checkout):
    summary = check_run(pretrain_run, "checkpoint")
    assert summary["job"] == "pretrain" and summary["steps"] > 0
    assert Path(summary["checkpoint"]).is_relative_to(checkout / "demo-output" / "runs" / "pretrain-smoke")
    shards = checkout / "demo-output" / "shards" / "sample"
    assert (shards / "_manifest.json").is_file(), "the smoke config built the sample shards into its data root"


def test_finetune_smoke_beats_chance_on_unseen_identities(finetune_run, checkout):
    summary = check_run(finetune_run, "checkpoint", "confusion_png", "metrics_csv")
    assert summary["job"] == "finetune" and summary["num_classes"] == 8 and summary["classes"][0] == "Neutral"
    assert Path(summary["checkpoint"]) == checkout / "demo-output" / "runs" / "finetune-smoke" / "best_checkpoint"
    assert summary["steps"] == summary["planned_steps"] > 0
    assert summary["last_loss"] < summary["first_loss"]
    # Chance macro F1 on 8 classes is 1/8; the held-out videos are identities never seen in training.
    assert summary["metrics"]["f1_macro"] > 2 / 8, summary["metrics"]
    confusion = summary["metrics"]["confusion"]
    assert len(confusion) == 8 and sum(map(sum, confusion)) == summary["metrics"]["count"]
    # The run's files: a metrics CSV with one row per report, the confusion PNG; the best is the best.
    csv = Path(summary["metrics_csv"]).read_text().splitlines()
    assert csv[0].startswith("loss,") and "val_f1_macro" in csv[0] and len(csv) > 2
    assert Path(summary["confusion_png"]).read_bytes()[:4] == b"\x89PNG"
    column = csv[0].split(",").index("val_f1_macro")
    best_f1 = max(float(row.split(",")[column] or 0) for row in csv[1:])
    assert summary["metrics"]["f1_macro"] == pytest.approx(best_f1)
    # The local Ray has no State API: Ray Train's cleaner warned of it every ~2 s (runtime.py drops it).
    assert STATE_API_WARNING not in finetune_run.output


def test_tune_smoke_killed_then_resumed_runs_exactly_its_trials(tune_run, checkout):
    killed = tune_run.killed
    assert 1 <= tune_run.finished_before < 3, f"`{TUNE}` was to be killed after its first trial:\n{killed.tail()}"
    summary = check_run(tune_run.resumed, "best_checkpoint", "best_config", "results_csv", "trials_png")
    assert summary["job"] == "tune"
    assert summary["errored"] == 0, f"errored trials: {summary['errors']}"
    assert summary["finished"] == summary["trials"] == 3  # search.num_samples: none lost, none run twice
    table = Path(summary["results_csv"]).read_text().splitlines()
    ids = [row.split(",")[0] for row in table[1:]]
    assert len(ids) == len(set(ids)) == 3
    assert Path(summary["sweep"]).is_relative_to(checkout / "demo-output" / "sweeps")


def test_label_sample_videos(label_run, checkout):
    summary = check_run(label_run, "out", "report", "videos_parquet")
    assert summary["job"] == "label"
    assert Path(summary["out"]) == checkout / "demo-output" / "labels"
    assert summary["ok"] >= 1 and summary["frames"] > 0
    assert list((checkout / "demo-output" / "labels" / "labels").glob("*.parquet")), "one Parquet per video"


def test_predict_with_the_builtin_model(predict_run, checkout):
    summary = check_run(predict_run, "inputs")
    assert summary["job"] == "predict" and summary["model"] == "builtin:fer-minixception"
    (video,) = summary["inputs"]
    assert video["frames"] > 0 and len(video["faces"]) == video["frames"]  # the astronaut, on every sampled frame
    assert Path(video["annotated"]) == checkout / "predictions" / "astronaut_000.annotated.mp4"


# ---------------------------------------------------------------------------
# `ray job submit --working-dir .` against `ray start --head` with token auth
# ---------------------------------------------------------------------------


@dataclass
class Head:
    address: str  # http://127.0.0.1:PORT: the dashboard and job API
    env: dict[str, str]  # what the user's shell holds: RAY_ADDRESS, token auth
    home: Path  # AFFECTRAY_HOME of the head (and so of every job driver)
    temp_dir: Path


def _in_sessions(sessions: set[int]) -> list[int]:
    """Live processes in one of our sessions (each `ray start` was a session leader)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if os.getsid(int(entry)) in sessions and stat[0] != "Z":
                found.append(int(entry))
        except (OSError, IndexError):
            pass
    return found


def _stop(sessions: set[int]) -> None:
    """Stop exactly the processes of these sessions: SIGTERM, then SIGKILL what is left."""
    for signum, grace in [(signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)]:
        for pid in _in_sessions(sessions):
            try:
                os.kill(pid, signum)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while _in_sessions(sessions) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def head(tmp_path_factory, checkout) -> Iterator[Head]:
    """One `ray start --head` on this machine: token auth, dashboard on 127.0.0.1, free ports.

    8 logical CPUs, as a local Ray of the jobs has on a small machine (Train workers and Ray
    Data tasks each hold a slot). The head, and so every job driver, has AFFECTRAY_HOME set to
    a folder of its own. Teardown stops exactly the processes this fixture started.
    """
    home = tmp_path_factory.mktemp("affectray_home")
    temp_dir = Path(f"/tmp/arrc-{uuid.uuid4().hex[:6]}")  # short: Ray's socket paths must fit 107 bytes
    token = secrets.token_hex(32)
    node_env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, AFFECTRAY_HOME=str(home))
    gcs, dashboard, client, agent = (_free_port() for _ in range(4))
    sessions: set[int] = set()
    try:
        for attempt in range(2):
            proc = subprocess.Popen(
                [
                    str(VENV_BIN / "ray"),
                    "start",
                    "--head",
                    f"--port={gcs}",
                    "--num-cpus=8",
                    f"--temp-dir={temp_dir}",
                    "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}",
                    f"--ray-client-server-port={client}",
                    f"--dashboard-agent-listen-port={agent}",
                    "--disable-usage-stats",
                ],
                env=node_env,
                cwd=checkout,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            sessions.add(proc.pid)  # the session id is the leader's pid; Ray's daemons stay in it
            out, _ = proc.communicate(timeout=180)
            if proc.returncode == 0 or attempt or RAY_START_TIMEOUT not in out:
                break
            print("\n[readme] ray start --head: the node start timed out (busy machine); starting it again")
            _stop(sessions)
        assert proc.returncode == 0, f"ray start --head failed:\n{out[-3000:]}"
        address = f"http://127.0.0.1:{dashboard}"
        client_env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ADDRESS=address)
        yield Head(address=address, env=client_env, home=home, temp_dir=temp_dir)
    finally:
        _stop(sessions)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(name: str, command: str, head: Head, checkout: Path) -> Run:
    run = _run(name, command, checkout, head.env)
    # What the job wrote must not be in Ray's unpacked copy of the working directory.
    packages = [p for p in head.temp_dir.rglob("*") if p.name in RAY_PACKAGE_PARTS] if head.temp_dir.exists() else []
    run.extra["outputs_in_package"] = sorted(
        str(p) for package in packages for p in package.rglob("demo-output") if p.is_dir()
    )
    return run


@pytest.fixture(scope="module")
def submit_pretrain_run(head, checkout, pretrain_run) -> Run:
    # Share the one ingested corpus: the relative data root resolves under AFFECTRAY_HOME.
    corpus = checkout / "demo-output" / "shards" / "sample"
    if corpus.is_dir():
        shutil.copytree(corpus, head.home / "demo-output" / "shards" / "sample", dirs_exist_ok=True)
    return _submit("submit pretrain", SUBMIT_PRETRAIN, head, checkout)


def _check_submitted(run: Run, head: Head, run_name: str) -> dict[str, Any]:
    summary = check_run(run, "checkpoint")
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint.is_relative_to(head.home / "demo-output" / "runs" / run_name), (
        f"`{run.command}`: the checkpoint {checkpoint} is not under AFFECTRAY_HOME={head.home}"
    )
    assert checkpoint.exists()
    assert not run.extra["outputs_in_package"], f"outputs written into Ray's package: {run.extra['outputs_in_package']}"
    return summary


def test_submit_pretrain_smoke(submit_pretrain_run, head):
    summary = _check_submitted(submit_pretrain_run, head, "pretrain-smoke")
    assert summary["job"] == "pretrain" and summary["steps"] > 0

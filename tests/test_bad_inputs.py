"""Bad input is one line, exit 2, naming the file or key; the local Ray listens on loopback; resume finds the newest.

- The platform's own local Ray (runtime.init_ray) answers on 127.0.0.1 / ::1 alone: every
  listening TCP socket of the driver's process tree is checked, in a real subprocess.
- A damaged checkpoint (truncated or foreign weights, a meta.json that is not JSON), an OUT
  that cannot be written, a missing bucket and config values that pass type checks but
  cannot work are refused by the CLI, as a user runs it, before Ray starts.
- A run killed between writing a checkpoint and Ray registering it resumes from that
  checkpoint, and the incomplete folders of a killed upload are removed (tidy_checkpoints,
  on the on-disk state such a kill leaves).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import REPO_ROOT

from affectray import storage

# ---------------------------------------------------------------------------
# The CLI, as a user runs it
# ---------------------------------------------------------------------------


def affectray(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "affectray.cli", *argv],
        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env,
    )  # fmt: skip


def assert_refused(run: subprocess.CompletedProcess, *named: str) -> None:
    """Exit 2, one `error:` line naming each of ``named``, no traceback, and Ray never started."""
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.stderr[-3000:]
    for name in named:
        assert name in errors[0], errors[0]
    assert "Started a local Ray instance" not in run.stderr, "the input was checked only after Ray started"


# ---------------------------------------------------------------------------
# 4. The local Ray listens on loopback alone
# ---------------------------------------------------------------------------

RAY_DRIVER = """
import sys
from affectray.runtime import init_ray

ray = init_ray()
ray.get(ray.remote(lambda: None).options(num_cpus=0.5).remote())  # a worker is up and serving
print("ready", flush=True)
sys.stdin.read()  # until the test closes stdin
ray.shutdown()
"""


def process_tree(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    tree, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            tree.add(child)
            todo.append(child)
    return tree


def socket_owners(pids: set[int]) -> dict[int, int]:
    """Socket inode -> the pid holding it open."""
    owners = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owners[int(target[8:-1])] = pid
    return owners


def listening_tcp() -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, int]]:
    """(address, port, inode) of every listening TCP socket, from /proc/net/tcp and tcp6."""
    found = []
    for family, table in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((ipaddress.ip_address(socket.inet_ntop(family, raw)), int(port, 16), int(fields[9])))
    return found


def is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket's loopback
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
def test_the_local_ray_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        [sys.executable, "-c", RAY_DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    try:
        assert driver.stdout.readline().strip() == "ready"
        owners = socket_owners(process_tree(driver.pid))
        ours = [(address, port, command(owners[inode])) for address, port, inode in listening_tcp() if inode in owners]
    finally:
        driver.stdin.close()
        driver.wait(timeout=60)
    # GCS, raylet, object manager, the driver's and the worker's gRPC servers at the least.
    assert len(ours) >= 5, ours
    exposed = [f"{address}:{port} ({name})" for address, port, name in ours if not is_loopback(address)]
    assert not exposed, f"listening beyond loopback: {exposed}"


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()[:80]
    except OSError:
        return str(pid)


# ---------------------------------------------------------------------------
# 5. Damaged checkpoints: predict, label and evaluate name the file
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory) -> Path:
    """A whole checkpoint of a tiny untrained classifier; tests damage copies of it."""
    from affectray.checkpoints import save_checkpoint
    from affectray.labels import ABAW8
    from affectray.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("frame", backbone="test_resnet", num_classes=8)
    meta = {
        "kind": "classifier",
        "model": model.describe(),
        "label_set": {"name": "abaw8", "classes": list(ABAW8.classes)},
        "preprocessing": {"mode": "frame", "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
    }
    directory = tmp_path_factory.mktemp("ckpt") / "whole"
    save_checkpoint(directory, model, meta)
    return directory


def damaged_copy(source: Path, target: Path, damage: str) -> Path:
    import shutil

    shutil.copytree(source, target)
    weights, meta = target / "model.safetensors", target / "meta.json"
    if damage == "truncated weights":  # an interrupted copy or upload
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "foreign weights":  # a .pth (a zip) saved under the checkpoint's weights name
        torch.save({"w": torch.zeros(2)}, weights)
    elif damage == "meta not json":
        meta.write_text(meta.read_text()[:-20])
    return target


def label_inputs(tmp_path: Path) -> Path:
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "clip.mp4").write_bytes(b"")  # listed by its name; the checkpoint fails first
    return videos


@pytest.mark.parametrize(
    "verb, damage",
    [
        ("predict", "truncated weights"),
        ("predict", "foreign weights"),
        ("predict", "meta not json"),
        ("label", "truncated weights"),
        ("evaluate", "truncated weights"),
    ],
)
def test_a_damaged_checkpoint_is_named_in_one_line(tmp_path, classifier_checkpoint, verb, damage):
    checkpoint = damaged_copy(classifier_checkpoint, tmp_path / "ckpt", damage)
    if verb == "predict":
        image = tmp_path / "face.png"
        image.write_bytes(b"\x89PNG\r\n\x1a\n")
        run = affectray("predict", str(image), "--checkpoint", str(checkpoint))
    elif verb == "label":
        run = affectray("label", str(label_inputs(tmp_path)), str(tmp_path / "out"), "--checkpoint", str(checkpoint))
    else:
        run = affectray("evaluate", str(checkpoint), str(tmp_path / "shards"))
    damaged_file = "meta.json" if damage == "meta not json" else "model.safetensors"
    assert_refused(run, str(checkpoint / damaged_file))


# ---------------------------------------------------------------------------
# 5. Outputs that cannot be written, a missing bucket
# ---------------------------------------------------------------------------


def test_label_into_an_out_that_cannot_be_written(tmp_path, classifier_checkpoint):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    out = blocker / "labels"
    run = affectray("label", str(label_inputs(tmp_path)), str(out), "--checkpoint", str(classifier_checkpoint))
    assert_refused(run, str(out), "is a file, not a folder")


def test_ingest_into_an_out_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    out = blocker / "shards"
    source = label_inputs(tmp_path)
    assert_refused(affectray("ingest", str(source), str(out)), str(out), "is a file, not a folder")


def test_ingest_into_a_missing_bucket(tmp_path, s3_server):
    source = label_inputs(tmp_path)
    run = affectray("ingest", str(source), "s3://no-such-bucket-affectray/shards")
    assert_refused(run, "s3://no-such-bucket-affectray/shards", "'no-such-bucket-affectray' does not exist")


# ---------------------------------------------------------------------------
# 5. Config values of the right type that cannot work
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "verb, setting, refusal",
    [
        ("pretrain", "train.checkpoint_every=0", "train.checkpoint_every=0: must be at least 1"),
        ("finetune", "train.batch_size=-4", "train.batch_size=-4: must be at least 1"),
    ],
)
def test_a_setting_that_cannot_work_is_refused_by_its_key(verb, setting, refusal):
    assert_refused(affectray(verb, "--set", setting), refusal)


def test_channels_last_is_refused_where_it_would_train_in_fp32_on_the_cpu():
    # PyTorch's fp32 channels-last backward of a 1x1 stride-2 convolution aborts the process on the CPU.
    from affectray.config import ConfigError, config_from_dict
    from affectray.train.finetune import FinetuneConfig
    from affectray.train.loop import TrainConfig, check_channels_last

    with pytest.raises(ConfigError, match=r"^train.channels_last=True: crashes fp32 training on the CPU"):
        config_from_dict(FinetuneConfig, {"train": {"channels_last": True, "precision": "fp32"}})
    auto = TrainConfig(channels_last=True)  # auto: fp32 on the CPU, bf16 on a GPU
    with pytest.raises(ConfigError, match=r"train.precision: auto is fp32 on the CPU"):
        check_channels_last(auto, use_gpu=False)
    check_channels_last(auto, use_gpu=True)
    check_channels_last(TrainConfig(channels_last=True, precision="bf16"), use_gpu=False)
    check_channels_last(TrainConfig(precision="fp32"), use_gpu=False)


def test_every_training_setting_is_checked_by_its_dotted_key():
    from affectray.config import ConfigError, config_from_dict
    from affectray.train.pretrain import PretrainConfig

    for key, value in [
        ("train.epochs", 0), ("train.log_every", 0), ("train.max_steps", 0), ("train.keep_checkpoints", 0),
        ("optim.lr", 0.0), ("optim.warmup_steps", -1), ("optim.accumulation", 0), ("optim.min_lr_ratio", 2.0),
        ("optim.betas", [0.9, 1.5]), ("optim.grad_clip", -1.0), ("optim.weight_decay", -0.1),
        ("run.num_workers", 0), ("run.cpus_per_worker", 0.0), ("run.max_failures", -2),
    ]:  # fmt: skip
        section, name = key.split(".")
        with pytest.raises(ConfigError, match=rf"^{key}="):
            config_from_dict(PretrainConfig, {section: {name: value}})
    # What the sections allow: no warmup, no clipping, unset max_steps, endless retries.
    config = config_from_dict(
        PretrainConfig,
        {"optim": {"warmup_steps": 0, "grad_clip": 0.0}, "train": {"max_steps": None}, "run": {"max_failures": -1}},
    )
    assert config.optim.warmup_steps == 0 and config.run.max_failures == -1


# ---------------------------------------------------------------------------
# 6. Resume from the newest whole checkpoint; incomplete folders go
# ---------------------------------------------------------------------------


def write_checkpoint(run_uri: str, name: str, step: int, tmp: Path) -> str:
    """A checkpoint folder as the loop writes it and Ray Train copies it into the run's folder."""
    from affectray.checkpoints import save_checkpoint

    local = tmp / name
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"optimizer": optimizer.state_dict(), "step": step, "epoch": 0, "epoch_done": False}
    save_checkpoint(local, model, {"kind": "pretrain", "step": step}, state)
    uri = storage.join(run_uri, name)
    storage.upload_dir(local, uri)
    return uri


def register(run_uri: str, *names: str) -> None:
    """Ray Train's checkpoint manager snapshot (its 2.60 layout) naming ``names``, the last the latest."""
    results = [{"version": 0, "checkpoint_dir_name": n, "metrics": {}} for n in names]
    snapshot = {
        "ray_version": "2.60.0", "checkpoint_results": results, "checkpoint_report_indices": list(range(len(names))),
        "latest_checkpoint_result": results[-1], "pending_training_results": [], "pending_validation_specs": [],
        "current_report_index": len(names), "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": [],
    }  # fmt: skip
    storage.write_text(storage.join(run_uri, "checkpoint_manager_snapshot.json"), json.dumps(snapshot))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_resume_takes_the_newest_whole_checkpoint_and_removes_incomplete_ones(tmp_path, where, request):
    from affectray.train.loop import tidy_checkpoints

    root = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path / "runs")
    run = storage.join(root, "pretrain")
    step10 = write_checkpoint(run, "checkpoint_2026-01-01_00-00-10.000000", 10, tmp_path)
    register(run, "checkpoint_2026-01-01_00-00-10.000000")
    # Killed after the step-20 upload, before Ray registered it; then during the step-30 upload.
    step20 = write_checkpoint(run, "checkpoint_2026-01-01_00-00-20.000000", 20, tmp_path)
    step30 = write_checkpoint(run, "checkpoint_2026-01-01_00-00-30.000000", 30, tmp_path)
    weights30 = storage.join(step30, "model.safetensors")
    storage.write_bytes(weights30, storage.read_bytes(weights30)[:100])
    storage.write_text(storage.join(run, "metrics.csv"), "step\n10\n")

    newest = tidy_checkpoints(run)
    assert newest is not None and (newest.uri, newest.step, newest.registered) == (step20, 20, False)
    assert not storage.exists(step30), "the incomplete checkpoint was left behind"
    assert storage.exists(step10) and storage.exists(storage.join(run, "metrics.csv"))

    # The resumed run registers its own checkpoints (the adopted one reported again first):
    # the adopted folder is then an older unregistered copy, and goes; Ray's own stay.
    step24 = write_checkpoint(run, "checkpoint_2026-01-01_00-00-24.000000", 24, tmp_path)
    register(run, "checkpoint_2026-01-01_00-00-10.000000", "checkpoint_2026-01-01_00-00-24.000000")
    newest = tidy_checkpoints(run)
    assert (newest.uri, newest.step, newest.registered) == (step24, 24, True)
    assert not storage.exists(step20) and storage.exists(step10)


def test_a_run_without_checkpoints_has_nothing_to_resume(tmp_path):
    from affectray.train.loop import tidy_checkpoints

    assert tidy_checkpoints(str(tmp_path / "runs" / "new")) is None

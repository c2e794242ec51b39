"""Shared fixtures: one local Ray for the session, a moto S3 server on loopback, tiny configs."""

from __future__ import annotations

import os

# One BLAS/OpenMP thread per process: on 2 cores, numpy's and torch's thread pools fight each
# other and the Ray workers (one eigvals of torch-fidelity's FID: 122 s threaded, 22 s single).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import signal  # noqa: E402
import socket
import subprocess
import sys
import time
import uuid

import pytest

from jobs.config import PipelineConfig, load_config
from pipelines.core.lease import LEASE_FILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "configs", "demo.yaml")

# Keep Ray quiet and small on the 2-core CI machine.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Fixtures that start Ray or another process: a test using one is marked `ray` (the slow tier).
PROCESS_FIXTURES = {"ray_local", "raw_latents", "writers", "mlflow_server", "ray_head"}
# Programs a test may not start unmarked: interpreters (a `sar` or `python -m jobs.cli` process), Ray's
# and MLflow's servers, a browser. Libraries' own short helpers (git, uname, ldconfig) are not refused.
SLOW_PROGRAMS = ("python", "sar", "ray", "mlflow", "chrom", "gcs_server", "raylet")


def pytest_collection_modifyitems(config, items):
    """Mark every test that uses a process-starting fixture `ray`, so `-m "not ray"` is the fast tier."""
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _unmarked_tests_start_no_process(request, monkeypatch):
    """A test not marked `ray` that starts Ray or a subprocess fails at once, naming the marker,
    instead of making the fast tier slow without anyone noticing."""
    if request.node.get_closest_marker("ray") is not None:
        yield
        return
    import subprocess

    import ray

    def refuse(what: str):
        raise RuntimeError(f"{request.node.nodeid} starts {what}: mark it @pytest.mark.ray")

    if not ray.is_initialized():
        monkeypatch.setattr(ray, "init", lambda *a, **k: refuse("Ray"))
    popen_init = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        program = os.path.basename(str(args[0] if isinstance(args, (list, tuple)) else str(args).split()[0]))
        if program.startswith(SLOW_PROGRAMS):
            refuse(f"a process ({program})")
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
    yield


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 on loopback; the standard AWS variables point every client at it."""
    import logging

    from moto.server import ThreadedMotoServer

    # The server thread logs each request; after a test's captured stream closes that logging fails noisily.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket; returns its s3:// URL."""
    import boto3
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray instance for the whole session (2 CPUs, a small object store).

    It depends on the S3 server so that Ray's workers inherit the endpoint variables.
    """
    import ray

    for attempt in range(3):  # a loaded machine can make Ray's node start time out; try again
        if ray.is_initialized():
            break
        try:
            ray.init(num_cpus=2, object_store_memory=300 * 1024 * 1024, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception for a node that timed out
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic ImageNet (4 classes x 6 images, 32 px) shared by the session."""
    from pipelines.data.synth import make_synthetic_imagenet

    root = tmp_path_factory.mktemp("imagenet")
    make_synthetic_imagenet(str(root), classes=4, per_class=6, size=32, seed=0, val_per_class=1)
    return str(root)


@pytest.fixture
def tiny_config(tmp_path, synth_root) -> PipelineConfig:
    """The demo config at test scale, writing under a fresh run_dir."""
    return load_config(DEMO_CONFIG, [f"run_dir={tmp_path / 'run'}", f"data.source={synth_root}"])


@pytest.fixture(scope="session")
def raw_latents(tmp_path_factory, ray_local):
    """Raw-pixel latents of a 96-image synthetic ImageNet: 16 px, patch 4 -> 4x4 tokens of 48 dims.

    96 rows make an epoch of 12 steps at batch 8, so training tests do not pay Ray Data's
    per-epoch start-up at every step.
    """
    from jobs import encode
    from pipelines.data.synth import make_synthetic_imagenet

    source = str(tmp_path_factory.mktemp("imagenet96"))
    # val: the reference of the in-training evaluation (local_runs in tests/test_pretrain.py)
    make_synthetic_imagenet(source, classes=4, per_class=24, size=16, seed=0, val_per_class=2)
    out = str(tmp_path_factory.mktemp("latents"))
    cfg = load_config(DEMO_CONFIG, [f"run_dir={out}", f"data.source={source}", "encode.image_size=16",
                                    "encode.patch=4", f"encode.output={out}/latents"])
    assert encode.main(cfg) == 0
    return f"{out}/latents"


SAR = os.path.join(os.path.dirname(sys.executable), "sar")  # the console script

TINY = {
    "encode": {"encoder": "raw", "image_size": 16, "patch": 4, "shard_rows": 4, "batch_size": 4,
               "storage_dtype": "float32"},
    "model": {"preset": "tiny", "grouping": "next-row"},
    "pretrain": {"steps": 4, "global_batch": 4, "micro_batch": 4, "checkpoint_every": 2, "log_every": 2,
                 "num_workers": 0, "precision": "fp32", "optim": {"warmup_steps": 0}},
    "cluster": {"num_cpus": 2, "object_store_memory": 200_000_000},
}


def tiny_run(tmp_path) -> tuple[str, PipelineConfig]:
    """(config file, resolved config) of a fresh run on 8 synthetic 16 px images: raw tokens, the tiny
    model, Ray Train's local mode (what a `sar` process test runs)."""
    import yaml

    from pipelines.data.synth import make_synthetic_imagenet

    source = tmp_path / "imagenet"
    make_synthetic_imagenet(str(source), classes=2, per_class=4, size=16, seed=1, val_per_class=0)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "data": {"source": str(source)}, **TINY}))
    return str(path), load_config(path)


def hold_once_leased(proc: subprocess.Popen, folder: str, timeout: float = 180.0) -> None:
    """Wait until `proc` holds the writer lease of `folder`, then stop it there (SIGSTOP): a process
    caught at a known point however fast or slow this machine is."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(os.path.join(folder, LEASE_FILE)):
        assert proc.poll() is None, f"the first launch ended ({proc.returncode}): {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "the first launch never took the writer lease"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGSTOP)


def encode_in_process(cfg) -> None:
    """The latents of `cfg` written by the library's own stages, called in this process (no Ray)."""
    import numpy as np

    from jobs.encode import job
    from pipelines.data import encode, latents
    from pipelines.data.codecs import make_codec
    from pipelines.data.preprocess import read_and_decode

    j, enc = job(cfg), cfg.encode
    listing = encode.list_source(j)
    batch = {latents.KEY: np.array(listing.keys, dtype=object),
             latents.LABEL: np.array([label for _, label in listing.items])}
    rows = encode.EncodeLatents(enc.encoder, None, enc.image_size, enc.patch, None, cfg.model.grouping, None,
                                enc.storage_dtype)(read_and_decode(batch, root=cfg.data.source, image_size=enc.image_size))
    written = latents.write_shard(rows, latents_url=cfg.latents_dir, run_id="test")
    committer = latents.Committer(cfg.latents_dir, encode.dataset_header(j, make_codec("raw", None, enc.image_size,
                                                                                       enc.patch, None), listing),
                                  None, set(), [])
    committer.add({k: v[0] for k, v in written.items()})
    committer.commit()


def upload_tree(local_dir: str, url: str) -> None:
    """Copy a local folder's files to an object-store URL (test set-up)."""
    from pipelines.core import storage

    fs, path = storage.filesystem(url)
    fs.put(local_dir.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)


def random_inception_weights(path: str, seed: int = 0) -> str:
    """torch-fidelity's FeatureExtractorInceptionV3 architecture with random weights, saved to `path`.

    Its constructor always loads a state dict (a download when no path is given), so it is
    built here with loading disabled; He-initialised convolutions keep the activations of
    the 94 layers at unit scale, so the features are informative (PyTorch's default init
    shrinks them to ~1e-8).
    """
    from unittest import mock

    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as tfi
    from torch import nn

    from pipelines.evaluate import fidelity

    class Unloaded(tfi.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):
            return None

    torch.manual_seed(seed)
    with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: {}):
        net = Unloaded(fidelity.EXTRACTOR, [fidelity.FID_LAYER])
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    torch.save(net.state_dict(), path)
    return path

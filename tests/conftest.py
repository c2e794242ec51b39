"""Shared fixtures: one local Ray for the session, a moto S3 server on loopback, tiny configs."""

from __future__ import annotations

import os

# One BLAS/OpenMP thread per process: on 2 cores, numpy's and torch's thread pools fight each
# other and the Ray workers (one eigvals of torch-fidelity's FID: 122 s threaded, 22 s single).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import socket  # noqa: E402
import uuid

import pytest

from jobs.config import PipelineConfig, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "configs", "demo.yaml")

# Keep Ray quiet and small on the 2-core CI machine.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 on loopback; the standard AWS variables point every client at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
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
    from pipelines.synth import make_synthetic_imagenet

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
    import argparse

    from jobs import encode
    from pipelines.synth import make_synthetic_imagenet

    source = str(tmp_path_factory.mktemp("imagenet96"))
    make_synthetic_imagenet(source, classes=4, per_class=24, size=16, seed=0, val_per_class=0)
    out = str(tmp_path_factory.mktemp("latents"))
    cfg = load_config(DEMO_CONFIG, [f"run_dir={out}", f"data.source={source}", "encode.image_size=16",
                                    "encode.patch=4", f"encode.output={out}/latents"])
    assert encode.main(cfg, argparse.Namespace(force=False)) == 0
    return f"{out}/latents"


def encode_in_process(cfg) -> None:
    """The latents of `cfg` written by the library's own stages, called in this process (no Ray)."""
    import numpy as np

    from jobs.encode import job
    from pipelines import encode, latents
    from pipelines.codecs import make_codec
    from pipelines.preprocess import read_and_decode

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
    from pipelines import storage

    fs, path = storage.filesystem(url)
    fs.put(local_dir.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)

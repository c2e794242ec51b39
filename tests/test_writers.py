"""First contact: two launches on one output as real processes, store failures and Ray start-up
failures through the command line, a training run that loses its writer lease."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from jobs.cli import main
from jobs.config import load_config
from jobs.parser import EX_TEMPFAIL
from pipelines.core.lease import LEASE_FILE, LeaseLost, WriterLease
from pipelines.data import latents
from pipelines.data.synth import make_synthetic_imagenet
from pipelines.train import checkpoints, driver
from pipelines.train.loop_config import METRICS
from tests.conftest import REPO, encode_in_process, free_port

TINY = {
    "encode": {"encoder": "raw", "image_size": 16, "patch": 4, "shard_rows": 4, "batch_size": 4,
               "storage_dtype": "float32"},
    "model": {"preset": "tiny", "grouping": "next-row"},
    "pretrain": {"steps": 4, "global_batch": 4, "micro_batch": 4, "checkpoint_every": 2, "log_every": 2,
                 "num_workers": 0, "precision": "fp32", "optim": {"warmup_steps": 0}},
    "cluster": {"num_cpus": 2, "object_store_memory": 200_000_000},
}


@pytest.fixture
def tiny(tmp_path):
    """(config file, resolved config) of a fresh run on 8 synthetic 16 px images."""
    source = tmp_path / "imagenet"
    make_synthetic_imagenet(str(source), classes=2, per_class=4, size=16, seed=1, val_per_class=0)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "data": {"source": str(source)}, **TINY}))
    return str(path), load_config(path)


SAR = os.path.join(os.path.dirname(sys.executable), "sar")  # the console script


def hold_once_leased(proc: subprocess.Popen, folder: str, timeout: float = 180.0) -> None:
    """Wait until `proc` holds the writer lease of `folder`, then stop it there (SIGSTOP), so the
    second launch meets a live lease however fast or slow this machine is."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(os.path.join(folder, LEASE_FILE)):
        assert proc.poll() is None, f"the first launch ended ({proc.returncode}): {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "the first launch never took the writer lease"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGSTOP)


def two_launches(command: str, config: str, folder: str) -> str:
    """`sar COMMAND -c CONFIG` twice at once: the second must refuse in one line naming the first,
    before starting Ray; the first must finish. Returns the first one's stdout."""
    first = subprocess.Popen([SAR, command, "-c", config], cwd=REPO, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        hold_once_leased(first, folder)
        try:
            second = subprocess.run([SAR, command, "-c", config], cwd=REPO, text=True, capture_output=True,
                                    timeout=300)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert second.returncode == EX_TEMPFAIL, second.stderr
    assert second.stderr.count("\n") == 1, second.stderr  # one line
    line = second.stderr.strip()
    assert line.startswith(f"sar {command}: error: {folder} is being written by host {socket.gethostname()} "
                           f"pid {first.pid} since "), line
    assert f"(sar {command} -c {config})" in line  # the owner's command line
    assert "Ray" not in second.stdout + second.stderr  # refused before Ray started
    assert first.returncode == 0, err[-3000:]
    assert "max_restarts" not in err  # Ray core's warning about actor restarts: none on a local Ray
    assert not os.path.exists(os.path.join(folder, LEASE_FILE))  # released
    return out


@pytest.mark.ray
def test_two_encodes_on_one_run_directory(tiny):
    config, cfg = tiny
    assert "wrote 8 rows" in two_launches("encode", config, cfg.latents_dir)
    manifest = latents.read_manifest(cfg.latents_dir)
    assert manifest["num_rows"] == 8 and len(manifest["shards"]) == 2
    assert all(os.path.exists(os.path.join(cfg.latents_dir, s["file"])) for s in manifest["shards"])


@pytest.mark.ray
def test_two_pretrains_on_one_run_directory(tiny):
    config, cfg = tiny
    encode_in_process(cfg)
    assert "pretrain done: step 4" in two_launches("pretrain", config, cfg.pretrain_dir)
    assert checkpoints.list_steps(cfg.pretrain_dir) == [2, 4]
    checkpoints.load_state(checkpoints.find_latest(cfg.pretrain_dir))  # whole: its digest matches


@pytest.mark.ray
def test_training_that_lost_its_lease_stops_without_writing(ray_local, tiny):
    _, cfg = tiny
    encode_in_process(cfg)
    manifest = latents.read_manifest(cfg.latents_dir)
    model_config = driver.build_model_config(cfg.model, manifest)
    lease = WriterLease(cfg.pretrain_dir, ttl_s=60).acquire()
    start = driver.claim_run_folder(cfg, "pretrain", cfg.pretrain_dir, model_config, lease)
    loop = driver.build_loop_config(cfg, "pretrain", cfg.pretrain_dir, model_config, manifest, {}, start_step=start,
                              lease=lease)
    lease.release()  # as if it had expired...
    with WriterLease(cfg.pretrain_dir, ttl_s=60, command="sar pretrain (the other one)"):  # ...and been taken
        dataset = driver.training_dataset(loop, cfg.latents_dir, manifest)
        with pytest.raises(LeaseLost, match=r"taken over by .*\(sar pretrain \(the other one\)\)"):
            driver.run_training(loop, dataset)
    assert checkpoints.list_steps(cfg.pretrain_dir) == []
    assert not os.path.exists(os.path.join(cfg.pretrain_dir, METRICS))


# Object-store failures through the command line, on moto --------------------------------------

def _cli(args: list[str], **env_changes: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for k, v in env_changes.items():
        env.pop(k, None) if v is None else env.__setitem__(k, v)
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=300)


@pytest.mark.ray  # `sar` subprocesses
@pytest.mark.parametrize("case", ["no credentials", "missing bucket", "unreachable endpoint", "run_dir bucket"])
def test_object_store_failures_are_one_line_naming_the_field(case, s3_bucket, tmp_path, synth_root):
    secret = f"sekrit-{uuid.uuid4().hex}"
    missing = f"s3://no-bucket-{uuid.uuid4().hex[:8]}"
    source, run_dir = f"{s3_bucket}/imagenet", str(tmp_path / "run")
    env: dict[str, str | None] = {"AWS_SECRET_ACCESS_KEY": secret}
    if case == "no credentials":
        env.update(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, AWS_SESSION_TOKEN=None, AWS_PROFILE=None,
                   AWS_WEB_IDENTITY_TOKEN_FILE=None, AWS_CONTAINER_CREDENTIALS_FULL_URI=None,
                   AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=None, AWS_EC2_METADATA_DISABLED="true",
                   AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
        field, url, code, said = "data.source", source, 1, "no credentials found"
    elif case == "missing bucket":
        source = f"{missing}/imagenet"
        field, url, code, said = "data.source", source, 1, f"bucket '{missing[5:]}' does not exist"
    elif case == "unreachable endpoint":
        endpoint = f"http://127.0.0.1:{free_port()}"
        env.update(AWS_ENDPOINT_URL_S3=endpoint, AWS_ENDPOINT_URL=endpoint, AWS_MAX_ATTEMPTS="2",
                   AWS_RETRY_MODE="standard")
        field, url, code, said = "data.source", source, EX_TEMPFAIL, f"cannot reach the object store at {endpoint}"
    else:  # the source is fine, the outputs' bucket is not there
        source, run_dir = synth_root, f"{missing}/run"
        field, url, code, said = "run_dir", f"{missing}/run/latents", 1, "does not exist"
    # Tracking off: the error alone is what is checked (a tracker in a run_dir that cannot be written says
    # so in a line of its own, tests/test_tracking.py).
    command = ["encode", "--config", os.path.join(REPO, "configs", "demo.yaml"), "--set", f"run_dir={run_dir}",
               "--set", f"data.source={source}", "--set", "tracking.backend=none"]
    if case == "missing bucket":
        command += ["--set", f"data.storage_options={{key: testing, secret: {secret}}}"]
    done = _cli(command, **env)
    assert done.returncode == code, done.stderr
    assert done.stderr.count("\n") == 1 and done.stdout == "", done.stderr
    line = done.stderr.strip()
    assert line.startswith(f"sar encode: error: {field} {url}"), line
    assert said in line, line
    assert secret not in done.stderr + done.stdout


def test_a_ray_that_does_not_start_is_one_line_with_the_remedy(tiny, monkeypatch, capsys):
    import ray

    config, cfg = tiny

    def timed_out(*args, **kwargs):
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", timed_out)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["encode", "-c", config]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("sar encode: error: could not start a local Ray (The current node timed out during "
                              "startup); try again"), err[-1]
    assert "cluster.address" in err[-1]
    assert not os.path.exists(os.path.join(cfg.latents_dir, LEASE_FILE))  # released on the way out


def test_up_to_date_and_bad_inputs_never_start_ray(tiny, monkeypatch, capsys):
    import ray

    config, cfg = tiny

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_ray)
    encode_in_process(cfg)
    assert main(["encode", "-c", config]) == 0  # every source file is in the latents: up to date
    assert "encode: up to date, 8 rows" in capsys.readouterr().out
    assert main(["encode", "-c", config, "--set", f"data.source={cfg.run_dir}/nowhere"]) == 1
    assert "data.source: no train/ folder" in capsys.readouterr().err
    assert main(["pretrain", "-c", config, "--set", f"encode.output={cfg.run_dir}/nowhere"]) == 1
    assert "no latents dataset at" in capsys.readouterr().err
    assert main(["pretrain", "-c", config, "--set", "encode.patch=8"]) == 1
    assert ("encode.patch: the latents at" in capsys.readouterr().err)
    assert main(["refine", "-c", config]) == 1
    assert "no pretrain checkpoint under" in capsys.readouterr().err
    assert main(["sample", "-c", config]) == 1
    assert "no checkpoint to sample from" in capsys.readouterr().err

"""First contact: two launches on one output as real processes, store failures and Ray start-up
failures through the command line, a training run that loses its writer lease."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import uuid

import pytest

from jobs.cli import main
from jobs.parser import EX_TEMPFAIL
from pipelines.core.lease import LEASE_FILE, LeaseLost, WriterLease
from pipelines.data import latents
from pipelines.train import checkpoints, driver
from pipelines.train.loop_config import METRICS
from tests.conftest import REPO, SAR, encode_in_process, free_port, hold_once_leased, tiny_run


@pytest.fixture
def tiny(tmp_path):
    """(config file, resolved config) of a fresh run on 8 synthetic 16 px images."""
    return tiny_run(tmp_path)


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


def ray_init_raises(monkeypatch, err: BaseException) -> None:
    """ray.init raises `err` (Ray cannot start, or be joined, or must not start), Ray counting as not started."""
    import ray

    def init(*args, **kwargs):
        raise err

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)


def test_a_ray_that_does_not_start_is_one_line_with_the_remedy(tiny, monkeypatch, capsys):
    config, cfg = tiny
    ray_init_raises(monkeypatch, Exception("The current node timed out during startup. This could happen because "
                                           "some of the raylet failed to startup or the GCS has become overloaded."))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["encode", "-c", config]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("sar encode: error: could not start a local Ray (The current node timed out during "
                              "startup); try again"), err[-1]
    assert "cluster.address" in err[-1]
    assert not os.path.exists(os.path.join(cfg.latents_dir, LEASE_FILE))  # released on the way out


def test_up_to_date_and_bad_inputs_never_start_ray(tiny, monkeypatch, capsys):
    config, cfg = tiny
    ray_init_raises(monkeypatch, AssertionError("Ray was started"))
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


def test_an_unreachable_ray_cluster_is_try_again_later(tiny, monkeypatch, capsys):
    config, cfg = tiny
    ray_init_raises(monkeypatch, ConnectionError("Failed to connect to GCS at address 10.0.0.9:6379 within 60 seconds"))
    assert main(["encode", "-c", config, "--set", "cluster.address=10.0.0.9:6379", "--set",
                 "tracking.backend=none"]) == EX_TEMPFAIL
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sar encode: error: cannot join the Ray cluster at 10.0.0.9:6379 (Failed to connect"), err
    assert not os.path.exists(os.path.join(cfg.latents_dir, LEASE_FILE))


def test_a_cut_shard_stops_training_in_one_line_before_ray(tiny, monkeypatch, capsys):
    """A latents shard cut to half its bytes: `sar pretrain` names it and starts no Ray; `sar encode`
    no longer calls the dataset up to date."""
    from jobs import encode

    config, cfg = tiny
    ray_init_raises(monkeypatch, AssertionError("Ray was started"))
    encode_in_process(cfg)
    shard = latents.read_manifest(cfg.latents_dir)["shards"][0]
    path = os.path.join(cfg.latents_dir, shard["file"])
    with open(path, "r+b") as f:
        f.truncate(shard["bytes"] // 2)
    assert main(["pretrain", "-c", config, "--set", "tracking.backend=none"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sar pretrain: error: latents shard {path}: {shard['bytes'] // 2} bytes, the manifest records "
                   f"{shard['bytes']} (cut short or replaced); run `sar encode` to encode its images again"], err
    status = encode.status(cfg)
    assert not status.up_to_date and shard["file"] in status.reason


@pytest.mark.ray
def test_a_full_disk_inside_a_training_run_is_one_line(ray_local, tiny, monkeypatch, capsys):
    """torch.save on a full disk (a RuntimeError over the OSError, as torch raises it) inside the
    training loop: one line naming the file and ENOSPC, no traceback, nothing but an empty folder."""
    import errno

    import torch

    config, cfg = tiny
    encode_in_process(cfg)

    def full(obj, f, *args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", full)
    assert main(["pretrain", "-c", config, "--set", "tracking.backend=none"]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"sar pretrain: error: /\S+/state\.pt: No space left on device \(ENOSPC\)", last), last
    # The cause said once, in that line: no trace of it (the session's earlier Ray Data threads may
    # log into this test's stream, which is not this command's output).
    assert err.count("No space left on device") == 1 and "unexpected pos" not in err, err[-3000:]
    assert checkpoints.list_steps(cfg.pretrain_dir) == []
    assert not os.path.exists(os.path.join(cfg.pretrain_dir, LEASE_FILE))


def _failures(run_dir: str):
    """(what a stage raised, as Ray hands it to the driver; the line expected after `sar pretrain: error: `)."""
    import errno

    from ray.exceptions import OutOfMemoryError, RayTaskError, UserCodeException
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    def chained(outer, inner):
        try:
            raise inner
        except BaseException:
            try:
                raise outer from inner
            except BaseException as err:
                return err

    full = OSError(errno.ENOSPC, "No space left on device", f"{run_dir}/pretrain/checkpoints/step_00000002/state.pt")
    denied = PermissionError(errno.EACCES, "Permission denied", f"{run_dir}/latents/part-x.parquet")
    data = chained(UserCodeException("UDF failed to process a data block."), ValueError("bad block\nmore detail"))
    memory = OutOfMemoryError("Task was killed due to the node running low on memory.\nMemory on the node was 15.2GB")
    return [
        (WorkerGroupError("rank 1 failed", {1: UserExceptionWithTraceback(full, "Traceback ...")}),
         f"run_dir {run_dir}/pretrain/checkpoints/step_00000002/state.pt: No space left on device (ENOSPC)"),
        (RayTaskError("write_shard", "Traceback ...", denied).as_instanceof_cause(),
         f"run_dir {run_dir}/latents/part-x.parquet: Permission denied (EACCES)"),
        (RayTaskError("map_batches", "Traceback ...", data).as_instanceof_cause(),
         "ValueError: bad block (`sar -v` shows the full trace)"),
        (ControllerError(memory), "out of memory: Task was killed due to the node running low on memory"),
    ]


def test_failures_inside_ray_wrappers_are_one_line_naming_the_cause(tmp_path, monkeypatch, capsys):
    from jobs import cli

    run_dir = str(tmp_path / "run")
    for raised, expected in _failures(run_dir):
        def fail(*args, raised=raised):
            raise raised

        monkeypatch.setattr(cli, "_run_command", fail)
        assert main(["pretrain", "-c", os.path.join(REPO, "configs", "demo.yaml"), "--set", f"run_dir={run_dir}",
                     "--set", "tracking.backend=none"]) == 1
        err = capsys.readouterr().err
        assert err == f"sar pretrain: error: {expected}\n", err
    assert main(["-v", "pretrain", "-c", os.path.join(REPO, "configs", "demo.yaml"), "--set", f"run_dir={run_dir}",
                 "--set", "tracking.backend=none"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("sar pretrain: error: out of memory")

"""Stopping on SIGTERM and SIGINT (pipelines/core/stop.py): the handlers, the training loop's stop at a
step boundary with its checkpoint, encode's and sample's stop at a batch boundary, and real `sar`
processes sent real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from jobs.config import load_config
from pipelines.core import stop
from pipelines.core.lease import LEASE_FILE
from pipelines.train import checkpoints
from tests.conftest import DEMO_CONFIG, REPO, SAR, encode_in_process, hold_once_leased, tiny_run


def test_the_first_signal_asks_the_second_stops_at_once():
    before = signal.getsignal(signal.SIGINT)  # pytest's own; SIG_IGN when started as a background job
    with stop.handling():
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL and stop.requested() == 0
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal: the handler runs before the next bytecode
        time.sleep(0.05)
        assert stop.requested() == signal.SIGTERM and not stop.forced()
        with pytest.raises(stop.Stopped) as stopped:
            stop.check("what was kept")
        assert stopped.value.exit_status == 143 and str(stopped.value) == "stopped by SIGTERM: what was kept"
        with pytest.raises(stop.Stopped) as at_once:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert at_once.value.at_once and at_once.value.exit_status == 130 and stop.forced()
    assert signal.getsignal(signal.SIGINT) is before  # the handler it replaced, again
    assert not isinstance(stop.Stopped(15), Exception)  # no `except Exception` on the way swallows it


def test_a_blocking_call_runs_beside_the_handlers_and_hears_of_the_stop(monkeypatch):
    told = []

    def work():
        monkeypatch.setattr(stop, "_requested", signal.SIGTERM)  # as the handler would, mid-call
        time.sleep(0.5)
        return "done"

    assert stop.run_in_thread(work, on_stop=told.append, poll_s=0.05) == "done"
    assert told == [signal.SIGTERM]  # once
    with pytest.raises(ZeroDivisionError):
        stop.run_in_thread(lambda: 1 / 0)


def test_a_second_signal_during_the_clean_up_of_a_stop_ends_in_one_more_line(tmp_path, monkeypatch, capsys):
    """SIGTERM stopped the stage; a second signal arrives while the driver leaves Ray: no traceback,
    the second signal's line and status."""
    from jobs import cli

    def stopped(*args):
        raise stop.Stopped(signal.SIGTERM, "newest checkpoint step 2")

    def interrupted():
        raise stop.Stopped(signal.SIGINT, "what was committed is kept", at_once=True)

    monkeypatch.setattr(stop, "_forced", False)
    monkeypatch.setattr(cli, "_run_command", stopped)
    monkeypatch.setattr(cli, "shutdown_ray", interrupted)
    assert cli.main(["pretrain", "-c", DEMO_CONFIG, "--set", f"run_dir={tmp_path}", "--set",
                     "tracking.backend=none"]) == 130
    assert capsys.readouterr().err.splitlines() == [
        "sar pretrain: stopped by SIGTERM: newest checkpoint step 2",
        "sar pretrain: stopped at once by a second SIGINT: what was committed is kept"]


@pytest.mark.ray
def test_a_stop_forwarded_by_the_driver_reaches_a_process_of_the_cluster(ray_local):
    """The Train workers' view of a stop: the driver's request, written once into Ray's key-value
    store, is what a Poll in another process of the cluster (a Ray task here) reads; forget() ends it."""
    key = f"stop-test-{os.getpid()}-{time.monotonic_ns()}"

    @ray_local.remote(num_cpus=0)
    def poll(key: str) -> tuple[int, int]:
        from pipelines.core import stop

        return stop.requested(), stop.Poll(key, every_s=0)()

    assert ray_local.get(poll.remote(key)) == (0, 0)
    stop.forward(key, signal.SIGTERM)
    assert ray_local.get(poll.remote(key)) == (0, signal.SIGTERM)  # forwarded, not this process's own
    stop.forget(key)
    assert ray_local.get(poll.remote(key)) == (0, 0)


class _Shard:
    """A Train dataset shard of in-memory batches; asks for a stop when batch `stop_at` is drawn."""

    def __init__(self, batches, stop_at, monkeypatch):
        self.batches, self.stop_at, self.monkeypatch = batches, stop_at, monkeypatch

    def iter_torch_batches(self, **kwargs):
        for i, b in enumerate(self.batches):
            if i + 1 == self.stop_at:
                self.monkeypatch.setattr(stop, "_requested", signal.SIGTERM)
            yield b


@pytest.mark.parametrize("after_s, saved", [(0.0, True), (3600.0, False)])
def test_training_stops_after_the_step_under_way_and_saves_when_the_checkpoint_is_old(
        after_s, saved, tmp_path, monkeypatch, capsys):
    """A stop asked for during step 3 ends the loop after step 3; the checkpoint is written unless the
    newest one is younger than checkpoint_on_stop_after_s (here: none yet, the run is a second old)."""
    import ray.train

    from pipelines.train import driver, worker
    from pipelines.train.loop_config import LoopConfig

    cfg = load_config(DEMO_CONFIG, [f"run_dir={tmp_path}", "model.preset=tiny", "model.grouping=next-row",
                                    "pretrain.steps=50", "pretrain.global_batch=4", "pretrain.micro_batch=4",
                                    "pretrain.num_workers=0", "pretrain.log_every=1", "pretrain.checkpoint_every=40",
                                    f"pretrain.checkpoint_on_stop_after_s={after_s}", "pretrain.eval_every=null"])
    manifest = {"grid": [2, 2], "token_dim": 6, "num_classes": 2}
    model_config = driver.build_model_config(cfg.model, manifest)
    loop = LoopConfig(stage="pretrain", stage_dir=cfg.pretrain_dir, train=driver.resolve_length(cfg.pretrain, 64),
                      model_config=model_config, token_space=manifest, inputs={}, run_config=cfg.public_dict(),
                      use_gpu=False, accum=1, plot=False)
    g = torch.Generator().manual_seed(0)
    batches = [{"label": torch.randint(0, 2, (4,), generator=g), "mean": torch.randn(4, 2, 2, 6, generator=g),
                "mean_flip": torch.randn(4, 2, 2, 6, generator=g)} for _ in range(16)]
    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 0,
                                                                          get_world_size=lambda: 1))
    monkeypatch.setattr(ray.train, "report", lambda metrics: None)
    st = worker.train_loop(loop, shard=_Shard(batches, stop_at=3, monkeypatch=monkeypatch))
    assert st.step == 3  # the step under way finished, no other began
    assert checkpoints.list_steps(cfg.pretrain_dir) == ([3] if saved else [])
    out = capsys.readouterr().out
    assert "SIGTERM: stopped after step 3; " + ("checkpoint saved at step 3" if saved else
                                                 "newest checkpoint at step 0") in out
    if saved:
        state, _ = checkpoints.load_state(checkpoints.find_latest(cfg.pretrain_dir))
        assert state["step"] == 3 and state["data"]["batch_in_epoch"] == 3  # resumes at batch 4


def test_encode_stops_between_shards_and_keeps_what_it_committed(tmp_path, synth_root, monkeypatch):
    """The stage's pipeline replaced by its writer called in this process: after the first shard a
    stop is asked for; that shard is committed, the rest of the source is left for the next run."""
    from jobs.encode import job
    from pipelines.data import encode, latents
    from pipelines.data.preprocess import read_and_decode

    cfg = load_config(DEMO_CONFIG, [f"run_dir={tmp_path}", f"data.source={synth_root}", "encode.image_size=16",
                                    "encode.patch=4"])
    j = job(cfg)

    class Pipeline:
        def iter_rows(self):
            for i, (keys, labels) in enumerate(_chunks(encode.list_source(j).items, 8)):
                batch = read_and_decode({latents.KEY: np.array(keys, dtype=object), latents.LABEL: np.array(labels)},
                                        root=cfg.data.source, image_size=16)
                rows = encode.EncodeLatents("raw", None, 16, 4, None, cfg.model.grouping, None, "float32")(batch)
                written = latents.write_shard(rows, latents_url=cfg.latents_dir, run_id="t")
                if i == 0:
                    monkeypatch.setattr(stop, "_requested", signal.SIGTERM)
                yield {k: v[0] for k, v in written.items()}

    monkeypatch.setattr(encode, "build_pipeline", lambda *a: Pipeline())
    with pytest.raises(stop.Stopped, match="8 rows committed to .*, 16 source files left; the same command"):
        encode.run_encode(j, commit_interval_s=3600)
    manifest, consumed, _ = latents.committed_state(cfg.latents_dir)
    assert manifest["num_rows"] == 8 and len(consumed) == 8 and len(manifest["shards"]) == 1
    monkeypatch.setattr(stop, "_requested", 0)
    assert len(encode.plan_encode(j).new_items) == 16  # the next run encodes the rest


def _chunks(items, n):
    for i in range(0, len(items), n):
        yield [k for k, _ in items[i:i + n]], [label for _, label in items[i:i + n]]


def test_sampling_stops_between_batches_and_counts_what_is_written(tmp_path, monkeypatch):
    import ray

    from pipelines.evaluate import sampling

    drawn = []

    class Dataset:
        def map_batches(self, *a, **k):
            return self

        def iter_batches(self, **k):
            for start in range(0, 12, 4):
                drawn.append(start)
                monkeypatch.setattr(stop, "_requested", signal.SIGINT)
                yield {sampling.INDEX: np.arange(start, start + 4)}

    monkeypatch.setattr(ray.data, "from_items", lambda items: Dataset())
    plan = sampling.SamplePlan(num_classes=3, per_class=4, seed=0)
    with pytest.raises(stop.Stopped, match=r"stopped by SIGINT: 4 of 12 images in .*; the same command makes"):
        sampling.run_pool("ckpt", plan, sampling.SampleSettings(guidance={"kind": "none"}, flow_steps=1),
                          str(tmp_path), list(range(12)), 1, 0)
    assert drawn == [0]


# Real processes, real signals -------------------------------------------------------------------

TINY_PRETRAIN = ["--set", "pretrain.steps=100000", "--set", "pretrain.checkpoint_every=100000",
                 "--set", "pretrain.log_every=1", "--set", "pretrain.checkpoint_on_stop_after_s=0",
                 "--set", "tracking.backend=none"]


def _wait_for(path: str, what: str, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and what in open(path).read()):
        assert proc.poll() is None, f"ended early ({proc.returncode})"
        assert time.monotonic() < deadline, f"{what!r} never appeared in {path}"
        time.sleep(0.05)


@pytest.mark.ray
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_sar_pretrain_saves_releases_and_exits_128_plus_it(signum, status, ray_local, tmp_path):
    """Kubernetes' and KubeRay's SIGTERM, or Ctrl-C's SIGINT: the step finishes, a checkpoint is
    written, the lease is released, the driver leaves Ray, and the command ends in one line with
    128 + the signal; no C stack dump (Ray's own SIGTERM handler), no abort by Ray Train's SIGINT
    handler, no clean-up error. The process joins the session's Ray, as a Ray Job's driver joins its
    cluster (a local Ray of its own would add its start-up to the suite's time)."""
    config, cfg = tiny_run(tmp_path)
    encode_in_process(cfg)
    out, err = tmp_path / "out", tmp_path / "err"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([SAR, "pretrain", "-c", config, *TINY_PRETRAIN], cwd=REPO, stdout=o, stderr=e,
                                env=env)
    try:
        _wait_for(str(out), "step=2 ", proc)
        proc.send_signal(signum)
        code = proc.wait(timeout=240)
    finally:
        proc.kill()
    stderr, stdout = err.read_text(), out.read_text()
    assert code == status, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    step = checkpoints.list_steps(cfg.pretrain_dir)[-1]
    assert last == (f"sar pretrain: stopped by {signum.name}: newest checkpoint step {step} of 100000 "
                    f"({checkpoints.find_latest(cfg.pretrain_dir)}); the same command resumes from it"), last
    assert f"{signum.name}: stopped after step {step}; checkpoint saved at step {step}" in stdout
    state, _ = checkpoints.load_state(checkpoints.find_latest(cfg.pretrain_dir))  # whole: its digest matches
    assert state["step"] == step >= 2
    for noise in ("Traceback", "SIGTERM received at time", "Ray is not initialized"):
        assert noise not in stderr, stderr[-3000:]
    assert not os.path.exists(os.path.join(cfg.pretrain_dir, LEASE_FILE))


@pytest.mark.ray
def test_sigint_then_a_second_signal_stops_at_once(tmp_path):
    """Ctrl-C, then SIGTERM before the stop is done: no waiting for Ray or a step; one line, the second
    signal's status, the lease released. Both signals reach the process while it is held (SIGSTOP)
    right after it took its lease, so the second always finds the first under way (Python runs the
    handlers in signal order: SIGINT's, then SIGTERM's)."""
    config, cfg = tiny_run(tmp_path)
    encode_in_process(cfg)
    proc = subprocess.Popen([SAR, "pretrain", "-c", config, *TINY_PRETRAIN], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        hold_once_leased(proc, cfg.pretrain_dir)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert "SIGINT received: stopping at the next safe point" in lines[-2], lines[-2:]
    assert lines[-1] == "sar pretrain: stopped at once by a second SIGTERM: what was committed is kept", lines[-1]
    assert "Traceback" not in stderr
    assert not os.path.exists(os.path.join(cfg.pretrain_dir, LEASE_FILE))

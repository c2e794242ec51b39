"""Pretraining end to end on Ray: local mode, 2 DDP workers with a worker failure, object storage."""

import json
import logging
import os
import re
from types import SimpleNamespace

import pytest
import torch

from jobs.config import load_config
from pipelines.core import tracking
from pipelines.core.errors import DatasetMismatch
from pipelines.train import checkpoints
from tests.conftest import DEMO_CONFIG

TRAIN = ["pretrain.global_batch=8", "pretrain.micro_batch=8", "pretrain.log_every=5",
         "pretrain.optim.lr=2e-3", "pretrain.optim.warmup_steps=5", "pretrain.ema_decay=0.9"]


def config(tmp_path, latents, *extra):
    """The demo config training on `latents` (16 px images) at test scale."""
    return load_config(DEMO_CONFIG, [f"run_dir={tmp_path}", f"encode.output={latents}", "encode.image_size=16",
                                     *TRAIN, *extra])


def history(stage_dir):
    with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def mean_loss(rows):
    return sum(r["loss"] for r in rows) / len(rows)


class Records(logging.Handler):
    """The messages a logger emits."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _captured(fn):
    """(return value, stdout, stderr) of fn(), its Python-level output captured."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        value = fn()
    return value, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory, raw_latents):
    """One local-mode pretraining of 40 steps with in-training evaluation, then a relaunch with 50 steps
    in a tracked run (which resumes): the two launches the tests below read."""
    from jobs import pretrain
    from pipelines.data.latents import read_manifest

    tmp_path = tmp_path_factory.mktemp("local-pretrain")
    source = read_manifest(raw_latents)["source"]  # the images the latents were encoded from
    evaluation = [f"data.source={source}", "pretrain.eval_every=20", "pretrain.eval_per_class=2",
                  "fid.evaluator=domain", "fid.domain.epochs=3", "encode.image_size=16", "sample.flow_steps=2"]
    first = config(tmp_path, raw_latents, "pretrain.steps=40", "pretrain.checkpoint_every=20", *evaluation)
    rc, _, _ = _captured(lambda: pretrain.main(first))
    assert rc == 0
    after_first = {"rows": history(first.pretrain_dir), "steps": checkpoints.list_steps(first.pretrain_dir),
                   "evals": [json.loads(line) for line in open(os.path.join(first.pretrain_dir, "evals.jsonl"))]}

    longer = config(tmp_path, raw_latents, "pretrain.steps=50", "pretrain.checkpoint_every=20", *evaluation)
    ray_logger, echoed = logging.getLogger("ray"), Records()
    level = ray_logger.level
    ray_logger.setLevel(logging.INFO)  # as a command's Ray logs: INFO reaches the console
    ray_logger.addHandler(echoed)
    try:
        with tracking.open_run(str(tmp_path)) as tr, tr.stage("pretrain", longer.pretrain_dir) as st:
            rc, out, err = _captured(lambda: pretrain.main(longer, tracker=st))
        assert rc == 0
    finally:
        ray_logger.removeHandler(echoed)
        ray_logger.setLevel(level)
    return SimpleNamespace(root=tmp_path, cfg=longer, first=after_first, out=out, err=err, echoed=echoed.messages,
                           run_id=st.run_id)


def test_local_pretrain_lowers_the_loss_and_checkpoints(local_runs):
    rows = local_runs.first["rows"]
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    assert mean_loss(rows[-2:]) < 0.9 * mean_loss(rows[:2])
    assert {"loss_early", "loss_middle", "loss_late", "lr", "grad_norm", "images_per_s", "tokens_per_s",
            "data_wait_fraction"} <= set(rows[-1])
    assert local_runs.first["steps"] == [20, 40]
    assert os.path.getsize(os.path.join(local_runs.cfg.pretrain_dir, "loss.png")) > 1000


def test_in_training_evaluations_score_the_ema_weights(local_runs):
    evals = local_runs.first["evals"]
    assert [e["step"] for e in evals] == [20, 40] and all(e["evaluator"] == "domain" for e in evals)
    # 8 samples (4 classes x 2): an accuracy is a count of right ones out of 8, a FID is positive.
    assert all(e["fid"] > 0 and e["num_samples"] == 8 and (e["accuracy"] * 8) == pytest.approx(round(e["accuracy"] * 8))
               for e in evals)
    assert os.path.getsize(os.path.join(local_runs.cfg.pretrain_dir, evals[-1]["grid"])) > 100


def test_a_relaunch_with_a_larger_budget_resumes_without_repeating_a_step(local_runs):
    assert "resumed from step 40" in local_runs.out
    assert re.search(r"^pretrain: 50/50 steps in \S+, [\d.,]+ steps/s$", local_runs.err, re.M), local_runs.err
    assert [line.split()[0] for line in local_runs.out.splitlines() if line.startswith("step=")] == ["step=45", "step=50"]
    assert not [m for m in local_runs.echoed if "Reported metrics" in m]  # one line per row, not two
    assert [r["step"] for r in history(local_runs.cfg.pretrain_dir)] == list(range(5, 51, 5))
    evals = [json.loads(line) for line in open(os.path.join(local_runs.cfg.pretrain_dir, "evals.jsonl"))]
    assert [e["step"] for e in evals] == [20, 40, 50]
    state, meta = checkpoints.load_state(checkpoints.find_latest(local_runs.cfg.pretrain_dir))
    assert state["step"] == meta["step"] == 50 and meta["config"]["pretrain"]["steps"] == 50
    assert set(state) >= {"model", "ema", "optimizer", "scheduler", "data"}


def test_the_tracked_relaunch_logs_every_row_once(local_runs):
    """The loop re-sends the rows before the resume (the store lacks them), then logs its own."""
    from mlflow.tracking import MlflowClient

    rows = history(local_runs.cfg.pretrain_dir)
    logged = MlflowClient(tracking.default_uri(str(local_runs.root))).get_metric_history(local_runs.run_id, "loss")
    assert sorted((m.step, m.value) for m in logged) == [(r["step"], pytest.approx(r["loss"])) for r in rows]


def test_the_ema_weights_load_for_sampling_and_differ_from_the_raw_weights(local_runs):
    latest = checkpoints.find_latest(local_runs.cfg.pretrain_dir)
    ema_model, meta = checkpoints.load_model(latest, "ema")
    raw_model, _ = checkpoints.load_model(latest, "raw")
    assert meta["weights_loaded"] == "ema"
    assert any(not torch.equal(a, b) for a, b in zip(ema_model.parameters(), raw_model.parameters()))
    out = ema_model.generate(torch.tensor([0, 1]), seeds=[1, 2], flow_steps=2)
    assert out.shape == (2, 16, 48) and torch.isfinite(out).all()


def test_mismatched_dataset_is_refused_before_workers_start(tmp_path, raw_latents):
    from jobs import pretrain

    cfg = config(tmp_path, raw_latents, "model.grouping=next-row")
    with pytest.raises(DatasetMismatch, match=r"grouping: dataset has next-neighbour, model expects next-row"):
        pretrain.main(cfg)
    cfg = config(tmp_path, raw_latents, "model.overrides={token_dim: 16}")
    with pytest.raises(DatasetMismatch, match=r"token_dim: dataset has 48, model expects 16"):
        pretrain.main(cfg)
    assert not os.path.exists(cfg.pretrain_dir)  # nothing started


def test_checkpoints_to_object_storage(tmp_path, raw_latents, s3_bucket):
    from jobs import pretrain

    cfg = config(tmp_path, raw_latents, "pretrain.steps=10", "pretrain.checkpoint_every=5",
                 f"pretrain.output={s3_bucket}/run/pretrain")
    assert pretrain.main(cfg) == 0
    assert checkpoints.list_steps(cfg.pretrain_dir) == [5, 10]
    latest = checkpoints.find_latest(cfg.pretrain_dir)
    assert latest == f"{s3_bucket}/run/pretrain/checkpoints/step_00000010"
    model, meta = checkpoints.load_model(latest, "ema")
    assert meta["step"] == 10 and meta["latents"]["token_dim"] == 48


def test_small_latents_are_read_by_the_driver_larger_ones_streamed_by_the_workers(raw_latents, monkeypatch):
    import numpy as np

    from pipelines.data import latents
    from pipelines.train import driver

    manifest = latents.read_manifest(raw_latents)
    loop = SimpleNamespace(token_space={"columns": list(manifest["columns"])}, storage_options={}, stream=None)
    dataset = driver.training_dataset(loop, raw_latents, manifest)
    assert dataset.num_blocks() == len(manifest["shards"])  # one block per shard, no read task
    assert dataset.columns() == ["label", "mean", "mean_flip"]  # the training columns only
    rows, expected = dataset.take_batch(1000, batch_format="numpy"), latents.load_arrays(raw_latents)
    assert expected.keys() == rows.keys() and all(np.array_equal(rows[c], expected[c]) for c in expected)

    # Past DRIVER_READ_MAX, or past a share of the object store, each worker streams its part of the shards
    # (pipelines/data/stream.py) and the trainer gets no dataset; data.reader forces either way.
    assert not driver.reads_stream("auto", manifest)
    assert driver.reads_stream("stream", manifest) and not driver.reads_stream("memory", manifest)
    monkeypatch.setattr(driver, "OBJECT_STORE_SHARE", 1e-12)
    assert driver.reads_stream("auto", manifest)
    monkeypatch.setattr(driver, "OBJECT_STORE_SHARE", 0.25)
    monkeypatch.setattr(driver, "DRIVER_READ_MAX", 0)
    assert driver.reads_stream("auto", manifest)
    assert driver.training_dataset(SimpleNamespace(stream=object()), raw_latents, manifest) is None


def test_the_plan_of_a_small_run_is_its_real_figures(local_runs):
    """`sar plan` on the run above: its rows, bytes, steps per epoch and checkpoint size are the run's."""
    from pipelines.data import latents
    from pipelines.train import plan

    cfg = local_runs.cfg
    p = plan.plan_of(cfg)
    manifest = latents.read_manifest(cfg.latents_dir)
    assert p.rows.value == manifest["num_rows"] == 96
    assert p.latents_bytes.value == sum(os.path.getsize(os.path.join(cfg.latents_dir, s["file"]))
                                        for s in manifest["shards"])
    latest = checkpoints.find_latest(cfg.pretrain_dir)
    state, meta = checkpoints.load_state(latest)
    assert state["data"]["epoch"] * p.steps_per_epoch("pretrain") + state["data"]["batch_in_epoch"] == meta["step"]
    assert p.steps["pretrain"] == meta["step"] == 50
    assert p.checkpoint_bytes <= os.path.getsize(os.path.join(latest, "state.pt")) <= 1.15 * p.checkpoint_bytes


@pytest.mark.slow
def test_two_workers_ddp_survive_a_worker_failure(tmp_path, raw_latents, monkeypatch):
    """2 gloo workers; the last one exits hard after step 6; FailureConfig restarts the group."""
    from jobs import pretrain

    marker = tmp_path / "failed-once"
    monkeypatch.setenv("SAR_FAIL_AT_STEP", "6")
    monkeypatch.setenv("SAR_FAIL_MARKER", str(marker))
    # 96 rows: 48 per worker, micro-batches of 4: the whole run is one epoch.
    cfg = config(tmp_path, raw_latents, "pretrain.steps=12", "pretrain.checkpoint_every=4", "pretrain.num_workers=2",
                 "pretrain.micro_batch=4", "pretrain.global_batch=8", "pretrain.max_failures=2",
                 "pretrain.log_every=2", "pretrain.optim.warmup_steps=2",
                 "pretrain.cpus_per_worker=0.5")  # leaves one of the 2 CPUs to Ray Data's read tasks
    assert pretrain.main(cfg) == 0
    assert marker.exists()  # the failure happened
    rows = history(cfg.pretrain_dir)
    assert [r["step"] for r in rows] == list(range(2, 13, 2))  # resumed at 4: no step repeated
    assert mean_loss(rows[-2:]) < mean_loss(rows[:2])
    assert checkpoints.list_steps(cfg.pretrain_dir)[-1] == 12


@pytest.mark.slow
def test_a_killed_run_resumes_when_relaunched(tmp_path, raw_latents, monkeypatch):
    """The training process dies hard after step 5 (checkpoint at 4) with no retries left; the same
    command launched again resumes from step 4 and ends at the configured final step."""
    import ray.train

    from jobs import pretrain

    marker = tmp_path / "killed"
    monkeypatch.setenv("SAR_FAIL_AT_STEP", "5")
    monkeypatch.setenv("SAR_FAIL_MARKER", str(marker))
    cfg = config(tmp_path, raw_latents, "pretrain.steps=8", "pretrain.checkpoint_every=4", "pretrain.num_workers=1",
                 "pretrain.micro_batch=4", "pretrain.global_batch=4", "pretrain.max_failures=0",
                 "pretrain.log_every=1", "pretrain.cpus_per_worker=0.5")
    with pytest.raises(ray.train.WorkerGroupError):
        pretrain.main(cfg)
    assert marker.exists() and checkpoints.list_steps(cfg.pretrain_dir) == [4]
    assert pretrain.main(cfg) == 0  # the marker now stops the drill: a plain relaunch
    assert [r["step"] for r in history(cfg.pretrain_dir)] == list(range(1, 9))
    assert checkpoints.list_steps(cfg.pretrain_dir) == [4, 8]


@pytest.mark.slow
def test_fsdp_two_workers_resume_after_a_failure(tmp_path, raw_latents, monkeypatch):
    """FSDP2 on 2 gloo workers: a worker dies after step 5, the group restarts from the full-state
    checkpoint of step 4 (model, EMA and optimizer re-sharded) and ends at step 8."""
    from jobs import pretrain

    marker = tmp_path / "failed-once"
    monkeypatch.setenv("SAR_FAIL_AT_STEP", "5")
    monkeypatch.setenv("SAR_FAIL_MARKER", str(marker))
    cfg = config(tmp_path, raw_latents, "pretrain.strategy=fsdp", "pretrain.steps=8", "pretrain.checkpoint_every=4",
                 "pretrain.num_workers=2", "pretrain.micro_batch=4", "pretrain.global_batch=16",
                 "pretrain.max_failures=1", "pretrain.log_every=2", "pretrain.cpus_per_worker=0.5")
    assert pretrain.main(cfg) == 0
    assert marker.exists()
    rows = history(cfg.pretrain_dir)
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert rows[-1]["loss"] < rows[0]["loss"]
    state, meta = checkpoints.load_state(checkpoints.find_latest(cfg.pretrain_dir))
    assert state["strategy"] == "fsdp" and meta["step"] == 8
    model, _ = checkpoints.load_model(checkpoints.find_latest(cfg.pretrain_dir), "ema")  # strict, unsharded
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), state["model"].values()))


def test_latents_made_with_other_encode_settings_are_refused(tmp_path, synth_root, caplog):
    """Training follows the latents' token space whatever the config says, and records the config:
    patch-4 latents under `encode.patch: 8` would train and say patch 8. Nothing here needs Ray."""
    import logging

    from pipelines.data.latents import read_manifest
    from pipelines.train import driver
    from tests.conftest import encode_in_process

    base = [f"run_dir={tmp_path}", f"data.source={synth_root}", "encode.image_size=16", "encode.patch=4"]
    cfg = load_config(DEMO_CONFIG, base)
    encode_in_process(cfg)
    manifest = read_manifest(cfg.latents_dir)
    model_config = driver.build_model_config(cfg.model, manifest)
    for override, message in [
        ("encode.patch=8", "encode.patch: the latents at .* were made with 4, the config says 8; set encode.patch=4"),
        ("encode.image_size=32", "encode.image_size: .* made with 16, the config says 32"),
        ("encode.encoder=kl-vae", "encode.encoder: .* made with raw, the config says kl-vae"),
        ("encode.patch=null", "encode.patch: .* made with 4, the config says 16"),  # raw's default patch
    ]:
        with pytest.raises(DatasetMismatch, match=message):
            driver.check_inputs(load_config(DEMO_CONFIG, [*base, override]), "pretrain", model_config, manifest)

    # A warm-up longer than the run is allowed (the schedule compresses it), and said once.
    long_warmup = load_config(DEMO_CONFIG, [*base, "pretrain.steps=10", "pretrain.optim.warmup_steps=50"])
    with caplog.at_level(logging.WARNING):
        driver.check_inputs(long_warmup, "pretrain", model_config, manifest)
        driver.check_inputs(cfg, "pretrain", model_config, manifest)
    assert caplog.text.count("warmup_steps") == 1
    assert "pretrain.optim.warmup_steps 50 is more than pretrain.steps 10" in caplog.text

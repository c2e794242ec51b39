"""Outputs written by an earlier release still load: tests/data/run-c8f7efd is a run folder (latents,
a pretrain checkpoint of a tiny model after two steps, its metrics, record and config binding) that
release c8f7efd wrote, before the library was split into layers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from jobs.config import config_from_dict
from jobs.stages import STAGES
from pipelines.core import rundir
from pipelines.evaluate import sampling
from pipelines.report import collect
from pipelines.train import checkpoints, driver, worker
from pipelines.train.loop_config import LoopConfig

OLD_RUN = Path(__file__).resolve().parent / "data" / "run-c8f7efd"


def old_run(tmp_path) -> Path:
    """A writable copy of the old run folder."""
    return Path(shutil.copytree(OLD_RUN, tmp_path / "run"))


def test_an_old_checkpoint_loads_and_samples(tmp_path):
    run = old_run(tmp_path)
    latest = checkpoints.find_latest(str(run / "pretrain"))
    assert latest is not None and latest.endswith("step_00000002")
    model, meta = checkpoints.load_model(latest, "ema")
    assert meta["step"] == 2 and meta["weights_loaded"] == "ema"
    plan = sampling.SamplePlan(num_classes=2, per_class=2, seed=0)
    settings = sampling.SampleSettings(guidance={"kind": "none"}, flow_steps=2)
    codec = sampling.load_generator(latest, "ema", None, torch.device("cpu"))[1]
    images = settings.render(model, codec, plan.rows(range(plan.size)), torch.device("cpu"))
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8


def test_an_old_run_folder_resumes_under_its_own_config(tmp_path):
    """Its config (saved in the checkpoint) still validates, the folder's binding accepts it, and the
    loop restores the weights, optimizer, schedule and data position from the checkpoint."""
    run = old_run(tmp_path)
    stage_dir = str(run / "pretrain")
    meta = checkpoints.read_meta(checkpoints.find_latest(stage_dir))
    cfg = config_from_dict({**meta["config"], "data": {**meta["config"]["data"], "storage_options": {}}})
    cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"output": stage_dir})})
    before = (run / "pretrain" / rundir.RUN_CONFIG).read_text()
    assert driver.claim_run_folder(cfg, "pretrain", stage_dir, meta["model_config"], lease=None) == 2
    assert (run / "pretrain" / rundir.RUN_CONFIG).read_text() == before  # the same binding: nothing rewritten
    train = driver.resolve_length(cfg.pretrain, 16)
    loop = LoopConfig(stage="pretrain", stage_dir=stage_dir, train=train, model_config=meta["model_config"],
                      token_space=meta["latents"], inputs=meta["inputs"], run_config=meta["config"], use_gpu=False,
                      accum=1)
    t, st = worker.prepare(loop, torch.device("cpu"))
    state, _ = checkpoints.load_state(checkpoints.find_latest(stage_dir))
    assert (st.step, st.epoch, st.batch_in_epoch) == (2, state["data"]["epoch"], state["data"]["batch_in_epoch"])
    assert all(torch.equal(a, state["model"][k]) for k, a in t.model.state_dict().items())
    assert t.sched.last_epoch == state["scheduler"]["last_epoch"]


def test_the_report_reads_an_old_run_folder(tmp_path):
    run = old_run(tmp_path)
    stages = collect.collect({s.name: str(run / s.folder) for s in STAGES})
    assert stages["pretrain"].checkpoint["step"] == 2 and len(stages["pretrain"].rows) == 2
    assert stages["encode"].manifest["encoder"] == "raw"
    assert all(not s.problems for s in stages.values())

"""`sar plan` (pipelines/train/plan.py, jobs/plan.py): its figures against a small run's real ones, its
projection of ImageNet before any latents exist, and its section of the run report."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from jobs.config import config_from_dict, load_config
from pipelines.data import latents
from pipelines.train import checkpoints, plan

OLD_RUN = Path(__file__).resolve().parent / "data" / "run-c8f7efd"  # a small real run (tests/test_compat.py)
IMAGENET_B = "configs/imagenet256-sar-b-klvae.yaml"


def run_config(run: Path):
    """The config the small run was made with (saved in its checkpoint), pointed at its folders."""
    meta = checkpoints.read_meta(checkpoints.find_latest(str(run / "pretrain")))
    return config_from_dict({**meta["config"], "run_dir": str(run),
                             "data": {**meta["config"]["data"], "storage_options": {}}})


def test_the_plan_of_a_small_run_is_its_real_figures(tmp_path):
    run = Path(shutil.copytree(OLD_RUN, tmp_path / "run"))
    cfg = run_config(run)
    p = plan.plan_of(cfg)
    manifest = latents.read_manifest(str(run / "latents"))
    shard = run / "latents" / manifest["shards"][0]["file"]
    assert p.rows.value == manifest["num_rows"] == 8 and p.rows.source.startswith("dataset")
    assert p.latents_bytes.value == os.path.getsize(shard)  # the bytes on disk
    latest = checkpoints.find_latest(str(run / "pretrain"))
    model, meta = checkpoints.load_model(latest, "raw")
    assert p.parameters == sum(t.numel() for t in model.parameters())
    state_bytes = os.path.getsize(os.path.join(latest, "state.pt"))
    assert p.checkpoint_bytes <= state_bytes <= 1.1 * p.checkpoint_bytes  # weights, EMA, moments; + history, framing
    # Its position: every step it took was a step of the epochs the plan counts.
    state, _ = checkpoints.load_state(latest)
    spe = p.steps_per_epoch("pretrain")
    assert spe == 8 // cfg.pretrain.global_batch == 2
    assert state["data"]["epoch"] * spe + state["data"]["batch_in_epoch"] == meta["step"] == 2
    assert p.reader == "memory" and p.requests_per_epoch == 1  # 22 KB: the driver reads its one shard
    text = p.text()
    assert "rows" in text and "dataset: the manifest at" in text and "22.7 KB" in text


def test_sar_plan_projects_imagenet_before_any_latents(tmp_path, capsys):
    from jobs.cli import main

    assert main(["plan", "--config", IMAGENET_B, "--set", f"run_dir={tmp_path}", "--gpus", "8", "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    assert "1,281,167   config: ImageNet-1k train" in out
    assert "pretrain steps per epoch                            625" in out  # floor(1,281,167 / 2,048)
    assert "477.0 images/s per GPU   measured: SAR-B" in out
    assert "wall time on 8 GPUs:" in out and "wall time on 64 GPUs:" in out and "dominant" in out
    assert "3,816 rows/s" in out  # 8 x 477: what a node of 8 must read
    cfg = load_config(IMAGENET_B, [f"run_dir={tmp_path}"])
    b = plan.make_plan(cfg, None, gpus=[8])
    h = plan.make_plan(load_config("configs/imagenet256-sar-h-klvae.yaml", [f"run_dir={tmp_path}"]), None, gpus=[8])
    # SAR-H's rate is SAR-B's at the same MFU: in inverse ratio of their FLOPs an image.
    rb, rh = b.stage("pretrain").rate, h.stage("pretrain").rate
    assert rh.source.startswith("projected") and rh.value * h.flops_per_image == pytest.approx(rb.value * b.flops_per_image)
    assert b.checkpoint_bytes == 16 * b.parameters and 139e6 < b.parameters < 141e6
    # A given rate replaces the default, and the wall time follows it.
    given = plan.make_plan(cfg, None, gpus=[8], rates={"pretrain": 954.0})
    assert given.stage("pretrain").hours(8) == pytest.approx(b.stage("pretrain").hours(8) / 2)
    # The stated size wins over ImageNet's.
    assert plan.make_plan(cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_images": 1000})}),
                          None).rows.value == 1000


@pytest.mark.parametrize("args, message", [(["--pretrain-rate", "-3"], "--pretrain-rate: -3 is not a positive rate"),
                                           (["--gpus", "0"], "--gpus / --gpus-per-node: at least 1")])
def test_sar_plan_refuses_bad_figures(tmp_path, capsys, args, message):
    from jobs.cli import main

    assert main(["plan", "--config", IMAGENET_B, "--set", f"run_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_the_report_shows_the_plan(tmp_path):
    from pipelines.report import page

    run = Path(shutil.copytree(OLD_RUN, tmp_path / "run"))
    cfg = run_config(run)
    html = open(page.write_report(str(run), cfg.outputs(), plan=plan.plan_of(cfg))).read()
    assert "<h2>Plan</h2>" in html and "steps per epoch" in html and "dataset: the manifest at" in html
    assert "<h2>Plan</h2>" not in open(page.write_report(str(run), cfg.outputs())).read()

"""Refinement end to end on local Ray from a tiny pretrain checkpoint, with resume."""

import json
import os

import pytest

from jobs.config import load_config
from pipelines.core.errors import SarError
from pipelines.train import checkpoints
from tests.conftest import DEMO_CONFIG

TRAIN = ["global_batch=8", "micro_batch=8", "log_every=2", "ema_decay=0.9"]


def config(tmp_path, latents, *extra):
    sets = [f"pretrain.{t}" for t in TRAIN] + [f"refine.{t}" for t in TRAIN]
    return load_config(DEMO_CONFIG, [f"run_dir={tmp_path}", f"encode.output={latents}", "encode.image_size=16",
                                     "pretrain.steps=6",
                                     "pretrain.checkpoint_every=6", *sets, *extra])


def test_refine_from_a_pretrain_checkpoint_and_resume(tmp_path, raw_latents, capsys):
    from jobs import pretrain, refine

    cfg = config(tmp_path, raw_latents, "refine.steps=4", "refine.checkpoint_every=2", "refine.sample_steps=2")
    with pytest.raises(SarError, match="no pretrain checkpoint"):
        refine.main(cfg)
    assert pretrain.main(cfg) == 0
    assert refine.main(cfg) == 0
    out = capsys.readouterr().out
    assert "refining from" in out and "step 6" in out and "ema weights" in out
    with open(os.path.join(cfg.refine_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [2, 4]
    assert {"loss_tf", "loss_csf", "gap_early", "gap_middle", "gap_late"} <= set(rows[-1])
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["loss_tf"] + cfg.refine.gamma * rows[-1]["loss_csf"], rel=1e-5)
    meta = checkpoints.read_meta(checkpoints.find_latest(cfg.refine_dir))
    assert meta["stage"] == "refine" and meta["step"] == 4
    pre = checkpoints.read_meta(checkpoints.find_latest(cfg.pretrain_dir))
    assert meta["inputs"]["init"] == pre["digest"]  # what it refined is recorded
    assert meta["model_config"] == pre["model_config"]

    longer = config(tmp_path, raw_latents, "refine.steps=6", "refine.checkpoint_every=2", "refine.sample_steps=2")
    assert refine.main(longer) == 0
    assert "resumed from step 4" in capsys.readouterr().out
    assert checkpoints.list_steps(cfg.refine_dir)[-1] == 6

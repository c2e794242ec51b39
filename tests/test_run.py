"""`sar run` end to end on CPU: a full run, a second run that skips everything, a grown dataset."""

import argparse
import json
import os
from types import SimpleNamespace

import pytest

from jobs.config import load_config
from jobs.run import run_pipeline
from pipelines.rundir import StageStatus
from pipelines.synth import make_synthetic_imagenet
from tests.conftest import DEMO_CONFIG
from tests.test_fid import _random_inception

TINY = ["encode.image_size=16", "encode.patch=4", "encode.shard_rows=64",
        "pretrain.steps=4", "pretrain.checkpoint_every=4", "pretrain.global_batch=4", "pretrain.micro_batch=4",
        "pretrain.log_every=2", "refine.steps=2", "refine.checkpoint_every=2", "refine.global_batch=4",
        "refine.micro_batch=4", "refine.log_every=1", "refine.sample_steps=2",
        "sample.per_class=2", "sample.flow_steps=2", "sample.batch_size=6",
        "fid.batch_size=8", "fid.grid_classes=3", "fid.grid_per_class=2"]


def run(cfg, capsys, **kw):
    args = argparse.Namespace(force=False, only_stage=None, from_stage=None, **kw)
    assert run_pipeline(cfg, args) == 0
    return capsys.readouterr().out


def manifest(cfg):
    with open(os.path.join(cfg.latents_dir, "_manifest.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_run_end_to_end_then_skip_then_grow(tmp_path, ray_local, capsys):
    source = tmp_path / "imagenet"
    make_synthetic_imagenet(str(source), classes=3, per_class=4, size=24, seed=0)
    weights = _random_inception(str(tmp_path / "inception.pt"))
    cfg = load_config(DEMO_CONFIG, [f"run_dir={tmp_path / 'run'}", f"data.source={source}",
                                    f"fid.reference={source}/train", f"fid.inception_weights={weights}", *TINY])

    # 1. Everything runs.
    out = run(cfg, capsys)
    for stage in ("encode", "pretrain", "refine", "sample", "fid"):
        assert f"[sar run] {stage}: running" in out
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["num_samples"] == 6 and metrics["fid"] is not None and metrics["fid"] > 0
    assert (tmp_path / "run" / "eval" / "grid.png").stat().st_size > 0
    first = manifest(cfg)
    assert first["num_rows"] == 12

    # 2. Nothing changed: every stage after encode is skipped and encode adds nothing.
    out = run(cfg, capsys)
    for stage in ("pretrain", "refine", "sample", "fid"):
        assert f"[sar run] {stage}: up to date" in out, out
    assert manifest(cfg)["shards"] == first["shards"]

    # 3. The source grows by one image per class: only those are encoded, then all that follows re-runs.
    make_synthetic_imagenet(str(source), classes=3, per_class=5, size=24, seed=0)
    out = run(cfg, capsys)
    grown = manifest(cfg)
    assert grown["num_rows"] == 15
    assert grown["shards"][: len(first["shards"])] == first["shards"]  # old shards kept as they were
    assert sum(s["rows"] for s in grown["shards"][len(first["shards"]):]) == 3  # only the new images
    for stage in ("pretrain", "refine", "sample", "fid"):
        assert f"[sar run] {stage}: running" in out, out
    archived = sorted(os.listdir(tmp_path / "run" / "archive"))
    assert [a.split("-")[0] for a in archived] == ["pretrain", "refine", "sample"]  # stale outputs kept aside
    new_metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert new_metrics["checkpoint_digest"] != metrics["checkpoint_digest"]


def fake_stage(name, called, rc=0, up_to_date=False):
    """A stage module's interface (status, output, main) that records being run."""
    return SimpleNamespace(status=lambda cfg: StageStatus(up_to_date, "test"), output=lambda cfg: "unused",
                           main=lambda cfg, args: called.append(name) or rc)


def test_only_and_from_choose_stages(tmp_path, capsys):
    called = []
    stages = {s: fake_stage(s, called) for s in ("encode", "pretrain", "refine", "sample", "fid")}
    cfg = load_config(DEMO_CONFIG, [f"run_dir={tmp_path}"])
    assert run_pipeline(cfg, argparse.Namespace(force=False, only_stage="refine", from_stage=None), stages) == 0
    assert called == ["refine"]
    called.clear()
    assert run_pipeline(cfg, argparse.Namespace(force=False, only_stage=None, from_stage="sample"), stages) == 0
    assert called == ["sample", "fid"]
    called.clear()
    stages["refine"] = fake_stage("refine", called, up_to_date=True)  # skipped
    assert run_pipeline(cfg, argparse.Namespace(force=False, only_stage=None, from_stage=None), stages) == 0
    assert called == ["encode", "pretrain", "sample", "fid"]
    called.clear()
    stages["pretrain"] = fake_stage("pretrain", called, rc=1)
    assert run_pipeline(cfg, argparse.Namespace(force=False, only_stage=None, from_stage=None), stages) == 1
    assert called == ["encode", "pretrain"] and "later stages not run" in capsys.readouterr().out

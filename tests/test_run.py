"""`sar run` end to end on CPU: a full run, a second run that skips everything, a grown dataset;
what each command leaves in the run directory's MLflow store."""

import json
import os
from types import SimpleNamespace

import pytest

from jobs import cli
from jobs.config import load_config
from jobs.run import run_pipeline
from pipelines.core import tracking
from pipelines.core.rundir import StageStatus
from pipelines.data import latents
from pipelines.data.synth import make_synthetic_imagenet
from tests.conftest import DEMO_CONFIG, random_inception_weights

TINY = ["encode.image_size=16", "encode.patch=4", "encode.shard_rows=64", "fid.evaluator=inception",
        "pretrain.steps=4", "pretrain.checkpoint_every=4", "pretrain.global_batch=4", "pretrain.micro_batch=4",
        "pretrain.log_every=2", "refine.steps=2", "refine.checkpoint_every=2", "refine.global_batch=4",
        "refine.micro_batch=4", "refine.log_every=1", "refine.sample_steps=2",
        "sample.per_class=2", "sample.flow_steps=2", "sample.batch_size=6",
        "fid.batch_size=8", "fid.grid_classes=3", "fid.grid_per_class=2"]


def run(overrides):
    """`sar run` as typed, its output captured: the command's MLflow run, its stages' nested runs, the report."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["run", "--config", DEMO_CONFIG, *[f"--set={o}" for o in overrides]]) == 0
    return out.getvalue()


def manifest(cfg):
    with open(os.path.join(cfg.latents_dir, "_manifest.json")) as f:
        return json.load(f)


def tracked_runs(run_dir):
    """(client, the parent run, {stage: [nested runs, oldest first]}) of a run directory's embedded store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.default_uri(run_dir))
    runs = client.search_runs([client.get_experiment_by_name("sar").experiment_id], order_by=["start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    stages = {}
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id:
            stages.setdefault(r.info.run_name, []).append(r)
    assert len(runs) == 1 + sum(map(len, stages.values()))  # every other run is nested in the parent
    return client, parents[0], stages


def steps(client, run, key):
    return [m.step for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, ray_local):
    """`sar run` three times on one run directory: from nothing, again with nothing changed, and after
    the source grew by one image per class. What each left is kept for the tests below."""
    tmp_path = tmp_path_factory.mktemp("sar-run")
    source = tmp_path / "imagenet"
    make_synthetic_imagenet(str(source), classes=3, per_class=4, size=24, seed=0)
    weights = random_inception_weights(str(tmp_path / "inception.pt"))
    run_dir = str(tmp_path / "run")
    overrides = [f"run_dir={run_dir}", f"data.source={source}", f"fid.reference={source}/train",
                 f"fid.inception_weights={weights}", *TINY]
    cfg = load_config(DEMO_CONFIG, overrides)
    first = SimpleNamespace(out=run(overrides), manifest=manifest(cfg), digest=latents.dataset_digest(cfg.latents_dir),
                            metrics=json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text()),
                            report=(tmp_path / "run" / "report.html").read_text(), tracked=tracked_runs(run_dir))
    second = SimpleNamespace(out=run(overrides), manifest=manifest(cfg), tracked=tracked_runs(run_dir))
    make_synthetic_imagenet(str(source), classes=3, per_class=5, size=24, seed=0)
    third = SimpleNamespace(out=run(overrides), manifest=manifest(cfg), tracked=tracked_runs(run_dir),
                            metrics=json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text()),
                            archived=sorted(os.listdir(tmp_path / "run" / "archive")))
    return SimpleNamespace(root=tmp_path, run_dir=run_dir, cfg=cfg, first=first, second=second, third=third)


@pytest.mark.slow
def test_sar_run_makes_every_stage_and_scores_the_samples(three_runs):
    first = three_runs.first
    for stage in ("encode", "pretrain", "refine", "sample", "fid"):
        assert f"[sar run] {stage}: running" in first.out
    assert first.metrics["num_samples"] == 6 and first.metrics["fid"] is not None and first.metrics["fid"] > 0
    assert (three_runs.root / "run" / "eval" / "grid.png").stat().st_size > 0
    assert first.manifest["num_rows"] == 12
    lines = first.out.strip().splitlines()
    run_dir = three_runs.run_dir
    assert lines[-2:] == [f"report: {run_dir}/report.html",
                          f"tracking: mlflow ui --backend-store-uri sqlite:///{run_dir}/mlflow/mlflow.db"]


@pytest.mark.slow
def test_sar_run_is_tracked_as_one_parent_run_with_a_nested_run_per_stage(three_runs):
    """The training rows at their steps, the final metrics, the artifacts; the report names the dataset."""
    first = three_runs.first
    client, parent, stages = first.tracked
    assert first.digest[:12] in first.report
    assert parent.info.status == "FINISHED" and parent.info.run_name == "run"
    assert {k: [r.info.status for r in v] for k, v in stages.items()} == \
        {s: ["FINISHED"] for s in ("encode", "pretrain", "refine", "sample", "fid")}
    assert parent.data.params["pretrain.steps"] == "4" and parent.data.params["model.preset"] == "tiny"
    assert parent.data.tags["dataset.digest"] == first.digest
    (pre,), (ref,), (fid,) = stages["pretrain"], stages["refine"], stages["fid"]
    assert steps(client, pre, "loss") == [2, 4] and steps(client, ref, "loss_csf") == [1, 2]
    assert {"loss_early", "lr", "grad_norm", "images_per_s", "data_wait_fraction"} <= set(pre.data.metrics)
    assert {"gap_early", "gap_late", "loss_tf"} <= set(ref.data.metrics)
    assert pre.data.tags["inputs.latents"] == first.digest and pre.data.params["pretrain.log_every"] == "2"
    assert ref.data.tags["inputs.init"] == pre.data.tags["outputs.checkpoint"] == \
        parent.data.tags["pretrain.checkpoint.digest"]
    assert fid.data.metrics["fid"] == pytest.approx(first.metrics["fid"])
    assert fid.data.metrics["inception_score.mean"] == pytest.approx(first.metrics["inception_score"]["mean"])
    assert fid.data.metrics["precision"] == pytest.approx(first.metrics["precision"])
    assert [a.path for a in client.list_artifacts(fid.info.run_id)] == ["grid.png", "metrics.json"]
    assert [a.path for a in client.list_artifacts(pre.info.run_id)] == ["loss.png"]
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["report.html"]


@pytest.mark.slow
def test_an_unchanged_run_directory_skips_every_stage_and_logs_no_step_twice(three_runs):
    second = three_runs.second
    for stage in ("pretrain", "refine", "sample", "fid"):
        assert f"[sar run] {stage}: up to date" in second.out, second.out
    assert second.manifest["shards"] == three_runs.first.manifest["shards"]  # encode added nothing
    _, parent, stages = three_runs.first.tracked
    client, again, stages_again = second.tracked
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert [r.info.run_id for r in stages_again["pretrain"]] == [stages["pretrain"][0].info.run_id]
    assert steps(client, stages_again["pretrain"][0], "loss") == [2, 4]
    assert steps(client, stages_again["refine"][0], "loss_csf") == [1, 2]


@pytest.mark.slow
def test_a_grown_source_encodes_only_the_new_images_and_remakes_what_follows(three_runs):
    first, third = three_runs.first, three_runs.third
    assert third.manifest["num_rows"] == 15
    assert third.manifest["shards"][: len(first.manifest["shards"])] == first.manifest["shards"]  # old shards kept
    assert sum(s["rows"] for s in third.manifest["shards"][len(first.manifest["shards"]):]) == 3  # only the new
    for stage in ("pretrain", "refine", "sample", "fid"):
        assert f"[sar run] {stage}: running" in third.out, third.out
    assert [a.split("-")[0] for a in third.archived] == ["pretrain", "refine", "sample"]  # stale outputs kept aside
    assert third.metrics["checkpoint_digest"] != first.metrics["checkpoint_digest"]


@pytest.mark.slow
def test_remade_stages_get_new_nested_runs_of_the_same_parent(three_runs):
    """Archived outputs are re-made in new nested runs; the grown dataset and the evaluation (re-scored in
    place) continue theirs."""
    _, parent, _ = three_runs.first.tracked
    client, again, stages = three_runs.third.tracked
    assert again.info.run_id == parent.info.run_id
    assert {k: len(v) for k, v in stages.items()} == {"encode": 1, "pretrain": 2, "refine": 2, "sample": 2, "fid": 1}
    assert steps(client, stages["pretrain"][1], "loss") == [2, 4]
    assert stages["fid"][0].data.metrics["fid"] == pytest.approx(three_runs.third.metrics["fid"])
    assert again.data.tags["dataset.digest"] == latents.dataset_digest(three_runs.cfg.latents_dir) != \
        three_runs.first.digest


def fake_stage(name, called, rc=0, up_to_date=False):
    """A stage module's interface (status, main) that records being run."""
    return SimpleNamespace(status=lambda cfg: StageStatus(up_to_date, "test"),
                           main=lambda cfg, options, tracker: called.append(name) or rc)


def test_only_and_from_choose_stages(tmp_path, capsys):
    called = []
    stages = {s: fake_stage(s, called) for s in ("encode", "pretrain", "refine", "sample", "fid")}
    cfg = load_config(DEMO_CONFIG, [f"run_dir={tmp_path}"])
    assert run_pipeline(cfg, only="refine", stages=stages) == 0
    assert called == ["refine"]
    called.clear()
    assert run_pipeline(cfg, start="sample", stages=stages) == 0
    assert called == ["sample", "fid"]
    called.clear()
    stages["refine"] = fake_stage("refine", called, up_to_date=True)  # skipped
    assert run_pipeline(cfg, stages=stages) == 0
    assert called == ["encode", "pretrain", "sample", "fid"]
    called.clear()
    stages["pretrain"] = fake_stage("pretrain", called, rc=1)
    (tmp_path / "report.html").unlink()
    assert run_pipeline(cfg, stages=stages) == 1
    assert called == ["encode", "pretrain"] and "later stages not run" in capsys.readouterr().out
    assert (tmp_path / "report.html").exists()  # the report of a failed run too


def test_a_failing_stage_command_is_tracked_and_tracking_none_writes_no_store(tmp_path, capsys):
    """`sar pretrain` without latents: exit 1, and its runs say FAILED; with tracking.backend=none
    nothing of MLflow is written. Both end with the tracking line."""
    run_dir = str(tmp_path / "run")
    assert cli.main(["pretrain", "--config", DEMO_CONFIG, "--set", f"run_dir={run_dir}"]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("sar pretrain: error: ") and len(err.strip().splitlines()) == 1
    assert out.strip().splitlines()[-1] == f"tracking: mlflow ui --backend-store-uri {tracking.default_uri(run_dir)}"
    client, parent, stages = tracked_runs(run_dir)
    assert parent.info.status == "FAILED" and parent.data.tags["sar.command"] == "pretrain"
    assert [r.info.status for r in stages["pretrain"]] == ["FAILED"] and set(stages) == {"pretrain"}

    quiet = str(tmp_path / "quiet")
    assert cli.main(["pretrain", "--config", DEMO_CONFIG, "--set", f"run_dir={quiet}", "--set",
                     "tracking.backend=none"]) == 1
    assert "tracking:" not in capsys.readouterr().out  # nothing to look at
    assert not os.path.exists(quiet)  # no store, no run records: the command failed before writing

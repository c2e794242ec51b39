"""The whole pipeline on a two-node Ray cluster that shares nothing but an S3 store, one node lost.

The scenario is benchmarks/cluster_run.py's: a Ray head (`node_a`) and a second node (`node_b`)
started on loopback with Ray's CLI, each with its own temp dir; moto's S3 holds the dataset and
every output; `sar submit --follow -- run` at toy scale with two Ray Train workers spread over the
nodes and a two-actor sampling pool; every process of `node_b` killed once pretraining has committed
a checkpoint. Both nodes' processes are stopped however the test ends.
"""

from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

import pytest

from benchmarks import cluster_run
from jobs.config import ConfigError, load_config
from pipelines.core import storage
from pipelines.evaluate import sampling
from pipelines.train import checkpoints, driver
from pipelines.train.loop_config import LoopConfig
from tests.conftest import DEMO_CONFIG

STEPS = 100  # pretraining steps: the kill follows the first checkpoint (step 10), ~80 steps before the end
SAMPLES = cluster_run.CLASSES * cluster_run.SAMPLES_PER_CLASS


def history(stage_dir: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(storage.join(stage_dir, "metrics.jsonl")).splitlines()]


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_on_two_nodes_survives_losing_one(s3_bucket, tmp_path, monkeypatch):
    # This process asks the loopback cluster's state API; the nodes run without token auth.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    store = {k: os.environ[k] for k in cluster_run.STORE_VARIABLES}
    out = cluster_run.run_scenario(store, s3_bucket, str(tmp_path), steps=STEPS, timeout_s=1200)
    print("\n" + "\n".join(f"{phase}: {s:.1f} s" for phase, s in out.seconds.items()))
    resumed = {int(s) for s in re.findall(r"resumed from step (\d+)", out.log)}
    print(f"worker groups {out.worker_groups}; sampling actors {out.sample_actors}; "
          f"killed after checkpoints {out.killed_after}; resumed from {sorted(resumed)}")

    assert out.returncode == 0, out.log[-3000:]
    assert re.search(r"^job sar-run-\S+ SUCCEEDED$", out.log, re.M)

    # The layout of a local run, all of it in the bucket.
    run = out.run_dir
    for path in ("latents/_manifest.json", "latents/_stage.json", "pretrain/_stage.json", "pretrain/loss.png",
                 "refine/_stage.json", "samples/index.json", "samples/_manifest.json", "samples/_stage.json",
                 "eval/metrics.json", "eval/grid.png", "eval/_stage.json", "evaluator.pt"):
        assert storage.exists(storage.join(run, path)), path
    assert checkpoints.list_steps(storage.join(run, "pretrain"))[-1] == STEPS
    assert checkpoints.list_steps(storage.join(run, "refine"))[-1] == cluster_run.REFINE_STEPS
    assert len(storage.read_json(storage.join(run, "samples/index.json"))) == SAMPLES
    domain = storage.read_json(storage.join(run, "eval/metrics.json"))["domain"]
    assert domain["fid"] > 0 and domain["num_samples"] == SAMPLES
    assert domain["accuracy"] * SAMPLES == pytest.approx(round(domain["accuracy"] * SAMPLES))  # a count of right ones
    assert out.local_outputs == []  # nothing landed on a node's own disk

    # Pretraining's first worker group had a worker on each node; node_b is gone; the restarted group
    # and refine's ran on the head, the only node left, as did the sampling pool's two actors (one
    # may end unplaced when the other has made all 8 images before the head had a CPU for it).
    assert out.worker_groups == [["node_a", "node_a"], ["node_a", "node_a"], ["node_a", "node_b"]]
    assert out.alive_at_end == {"node_a"}
    assert len(out.sample_actors) == 2 and out.sample_actors[0] == "node_a"
    assert set(out.sample_actors) <= {"node_a", "unplaced"}

    # Killed after a committed checkpoint; the restarted group resumed from the newest one, repeated no
    # step and finished the run.
    assert out.killed_after and max(out.killed_after) < STEPS
    assert len(resumed) == 1 and max(out.killed_after) <= resumed.pop() < STEPS
    assert [r["step"] for r in history(storage.join(run, "pretrain"))] == list(range(5, STEPS + 1, 5))
    assert f"pretrain done: step {STEPS}, loss " in out.log
    assert f"refine done: step {cluster_run.REFINE_STEPS}, loss_tf " in out.log


# The placement keys, without a cluster ------------------------------------------------------------
def test_placement_keys_default_to_ray_s_behaviour_and_refuse_cpu_and_gpu():
    cfg = load_config(DEMO_CONFIG)
    assert (cfg.pretrain.placement_strategy, cfg.refine.placement_strategy) == ("PACK", "PACK")
    assert cfg.pretrain.resources_per_worker == cfg.refine.resources_per_worker == cfg.sample.resources_per_actor == {}
    cfg = load_config(DEMO_CONFIG, ["refine.placement_strategy=STRICT_SPREAD", "refine.resources_per_worker={trainer: 1}",
                                    "sample.resources_per_actor={sampler: 0.5}"])
    assert cfg.refine.placement_strategy == "STRICT_SPREAD" and cfg.refine.resources_per_worker == {"trainer": 1.0}
    assert cfg.sample.resources_per_actor == {"sampler": 0.5} and cfg.pretrain.placement_strategy == "PACK"
    for bad, says in [("pretrain.placement_strategy=spread", "'pretrain.placement_strategy'"),
                      ("pretrain.resources_per_worker={CPU: 2}", "'CPU' is not a custom resource"),
                      ("sample.resources_per_actor={GPU: 1}", "'GPU' is not a custom resource"),
                      ("sample.resources_per_actor={sampler: -1}", "cannot be negative")]:
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_config(DEMO_CONFIG, [bad])


class _Dataset:
    """Stands in for a Ray Dataset: records what the stage asks of it."""

    def __init__(self):
        self.map_batches_args: dict = {}

    def select_columns(self, columns):
        return self

    def map_batches(self, fn, **kwargs):
        self.map_batches_args = kwargs
        return self

    def iter_batches(self, **kwargs):
        return iter(())


def test_train_placement_reaches_the_scaling_config(monkeypatch, tmp_path):
    import ray.train.torch

    built = {}

    class Trainer:  # records TorchTrainer's arguments instead of starting workers
        def __init__(self, fn, **kwargs):
            built.update(kwargs)

        def fit(self):
            return SimpleNamespace(metrics={})

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Trainer)

    def scaling(*sets: str):
        cfg = load_config(DEMO_CONFIG, ["pretrain.num_workers=2", "pretrain.global_batch=64", *sets])
        loop = LoopConfig(stage="pretrain", stage_dir=str(tmp_path), train=cfg.pretrain, model_config={},
                          token_space={}, inputs={}, run_config={}, use_gpu=False, accum=1)
        driver.run_training(loop, _Dataset())
        return built["scaling_config"]

    default = scaling()
    assert default.placement_strategy == "PACK" and default.resources_per_worker == {"CPU": 1.0}
    placed = scaling("pretrain.placement_strategy=SPREAD", "pretrain.resources_per_worker={trainer: 1}",
                     "pretrain.cpus_per_worker=2")
    assert placed.placement_strategy == "SPREAD" and placed.num_workers == 2
    assert placed.resources_per_worker == {"CPU": 2.0, "trainer": 1.0}


def test_sample_resources_reach_the_actor_pool(monkeypatch):
    import ray.data

    dataset = _Dataset()
    monkeypatch.setattr(ray.data, "from_items", lambda items: dataset)
    plan, settings = sampling.SamplePlan(2, 1, seed=0), sampling.SampleSettings(guidance={}, flow_steps=1)
    sampling.run_pool("s3://b/ckpt", plan, settings, "s3://b/samples", [0, 1], 2, 1.0)
    assert dataset.map_batches_args["resources"] is None and dataset.map_batches_args["compute"].max_size == 2
    sampling.run_pool("s3://b/ckpt", plan, settings, "s3://b/samples", [0, 1], 2, 1.0,
                      resources_per_actor={"sampler": 0.5})
    assert dataset.map_batches_args["resources"] == {"sampler": 0.5}

"""The training reader of large datasets (pipelines/data/stream.py) and the synthetic KL-16 latents
(pipelines/data/synth_latents.py): every row once per epoch across the workers, a new order every
epoch, a resumed epoch that reads exactly the rest, bounded windows, the reads it issues.

Function-level tests read a small `sar synth-latents` set directly (locally and on moto's S3);
one real two-worker Ray Train run checks the same properties through the training loop, a kill and
a restart included."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.core.errors import SarError
from pipelines.data import latents
from pipelines.data.stream import LatentStream
from pipelines.data.synth_latents import make_synthetic_latents

KEYED = ["key", *latents.TRAIN_COLUMNS]


def plan_only(rows, micro=4, accum=2, world=3, buffer_rows=40, seed=0) -> LatentStream:
    """A stream over shards of the given row counts, for what needs no file (the plan of an epoch)."""
    return LatentStream(urls=tuple(f"/nowhere/{i}" for i in range(len(rows))), rows=tuple(rows),
                        sizes=tuple(0 for _ in rows), columns=("label",), shapes={"label": ()}, micro_batch=micro,
                        rows_per_step=micro * accum, world=world, seed=seed, buffer_rows=buffer_rows)


def key_of(stream: LatentStream):
    """(shard, row) -> the synthetic key written there (shards in the manifest's order, rows numbered on)."""
    starts = np.cumsum([0, *stream.rows])
    return lambda shard, row: f"synthetic/{starts[shard] + row:09d}"


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> str:
    """600 KL-16 rows in uneven shards of 64 (the last of 24)."""
    out = str(tmp_path_factory.mktemp("synth") / "latents")
    make_synthetic_latents(out, 600, shard_rows=64, seed=3)
    return out


def stream_of(url: str, **kw) -> LatentStream:
    args = dict(micro_batch=8, rows_per_step=16, world=2, seed=1, buffer_rows=100)
    return LatentStream.from_manifest(url, latents.read_manifest(url), KEYED, **{**args, **kw})


def keys(stream: LatentStream, epoch: int, rank: int, **kw) -> list[str]:
    return [k for batch in stream.batches(epoch, rank, **kw) for k in batch["key"]]


# The plan of an epoch ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows, world, micro, accum", [((100, 37, 250, 64, 1, 90), 3, 4, 2),
                                                       ((512,) * 4, 2, 64, 1), ((7, 7, 7), 1, 5, 1)])
def test_exactly_once_per_epoch_across_workers_in_the_plan(rows, world, micro, accum):
    s = plan_only(rows, micro=micro, accum=accum, world=world)
    every = {(i, r) for i, n in enumerate(rows) for r in range(n)}
    orders = []
    for epoch in range(3):
        per_rank = [s.row_ids(epoch, rank) for rank in range(world)]
        assert all(len(ids) == s.steps_per_epoch * micro * accum for ids in per_rank)
        seen = [i for ids in per_rank for i in ids]
        assert len(seen) == len(set(seen)) and set(seen) <= every  # no row twice, none made up
        left_out = every - set(seen)
        assert len(left_out) == sum(rows) - s.steps_per_epoch * s.global_batch < s.global_batch
        orders.append((per_rank[0], left_out))
    assert orders[0][0] != orders[1][0] != orders[2][0]  # a new order every epoch
    if len(orders[0][1]) > 1:
        assert orders[0][1] != orders[1][1]  # and another set of rows sits it out


def test_windows_bound_the_buffer_and_follow_the_shard_order():
    s = plan_only((100, 37, 250, 64, 1, 90), buffer_rows=40)
    for rank in range(3):
        windows = s.windows(0, rank)
        assert [p for w in windows for p in w] == s.pieces(0, rank)
        assert all(sum(p.rows for p in w) <= 40 or len(w) == 1 for w in windows)
    # Pieces run through the epoch's shard order, cut where one worker's range ends and the next begins.
    ranges = [s.pieces(0, rank) for rank in range(3)]
    assert [p.shard for p in ranges[0]] == list(s.order(0)[: len(ranges[0])])
    assert ranges[0][-1].shard == ranges[1][0].shard or ranges[0][-1].stop == s.rows[ranges[0][-1].shard]


def test_the_step_count_is_the_same_on_every_worker_and_refuses_a_stray_rank():
    s = plan_only((10, 10, 10), micro=2, accum=1, world=2)
    assert s.steps_per_epoch == 7 and s.rows_per_rank == 14  # 30 rows at 4 a step: 7 steps, 2 rows left out
    with pytest.raises(ValueError, match="rank 2 of a stream planned for 2 workers"):
        next(s.batches(0, 2))
    with pytest.raises(ValueError, match="start 3 is not a multiple of micro_batch 2"):
        next(s.batches(0, 0, start=3))


# Reading a real set ---------------------------------------------------------------------------------------
def test_exactly_once_per_epoch_reading_a_synthetic_set(small_set):
    s = stream_of(small_set)
    key = key_of(s)
    all_keys = set(latents.load_arrays(small_set, ["key"])["key"])
    assert len(all_keys) == 600
    for epoch in range(2):
        read = {rank: keys(s, epoch, rank) for rank in range(2)}
        # The rows come in the planned order, so the plan's figures are the reader's.
        assert all(read[rank] == [key(*i) for i in s.row_ids(epoch, rank)] for rank in range(2))
        seen = read[0] + read[1]
        assert len(seen) == len(set(seen)) == s.steps_per_epoch * s.global_batch == 576
        assert set(seen) <= all_keys
    assert keys(s, 0, 0) != keys(s, 1, 0)


def test_exactly_once_when_resumed_mid_epoch(small_set):
    """A worker resumed at row p of its range reads exactly the rows after p, in the same order, whichever
    window p falls in (the loop resumes at whole micro-batches)."""
    s = stream_of(small_set)
    full = keys(s, 1, 1)
    for start in (0, 8, 96, 104, 200, len(full) - 8):
        assert keys(s, 1, 1, start=start) == full[start:]
        assert keys(s, 1, 1, start=start, prefetch=0) == full[start:]


def test_exactly_once_through_the_training_loops_steps(small_set):
    """worker.step_batches over the stream: epoch after epoch, and from a saved position (a checkpoint's
    epoch and batch_in_epoch), the same micro-batches as the uninterrupted run."""
    from types import SimpleNamespace

    from pipelines.train.worker import LoopState, step_batches

    s = stream_of(small_set, world=1, rows_per_step=16)  # micro-batches of 8, accumulation 2
    train, spe = SimpleNamespace(micro_batch=8), s.steps_per_epoch

    def run(st: LoopState, steps: int) -> list[list[str]]:
        out, it = [], step_batches(s, train, st, 0, 2)
        for _ in range(steps):
            out.append([k for micro in next(it) for k in micro["key"]])
            st.step += 1
            st.batch_in_epoch += 1
        return out

    whole = run(LoopState(), spe + 5)
    epoch0 = [k for step in whole[:spe] for k in step]
    assert len(epoch0) == len(set(epoch0)) == spe * 16 == 592
    assert whole[spe] != whole[0]  # epoch 1 starts in another order
    assert run(LoopState(step=spe + 2, epoch=1, batch_in_epoch=2), 3) == whole[spe + 2:]
    assert run(LoopState(step=spe - 1, epoch=0, batch_in_epoch=spe - 1), 3) == whole[spe - 1:spe + 2]


def test_batches_are_torch_tensors_of_the_stored_values(small_set):
    import torch

    s = stream_of(small_set, world=1, rows_per_step=8)
    batch = next(iter(s.batches(0, 0)))
    assert batch["mean"].dtype == torch.uint16 and batch["mean"].shape == (8, 16, 16, 16)
    assert batch["label"].dtype == torch.int64 and 0 <= int(batch["label"].min()) <= int(batch["label"].max()) < 1000
    stored = latents.load_arrays(small_set, KEYED)
    where = {k: i for i, k in enumerate(stored["key"])}
    rows = [where[k] for k in batch["key"]]
    for column in latents.TRAIN_COLUMNS:
        assert np.array_equal(batch[column].numpy(), stored[column][rows])
    # The flip pair is the mirrored grid, as encode stores an image and its flip.
    assert torch.equal(batch["mean_flip"], batch["mean"].flip(2))


def test_a_consumer_that_stops_early_stops_the_reading_thread(small_set):
    s = stream_of(small_set, buffer_rows=64)
    before = threading.active_count()
    it = s.batches(0, 0)
    next(it)
    it.close()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_a_shard_that_changed_under_the_run_is_named(tmp_path):
    out = str(tmp_path / "latents")
    make_synthetic_latents(out, 48, shard_rows=16)
    s = stream_of(out, rows_per_step=8, world=1)
    victim = s.urls[s.pieces(0, 0)[0].shard]
    rewritten = {**latents.read_manifest(out), "shards": latents.read_manifest(out)["shards"][:1]}
    table = __import__("pyarrow.parquet").parquet.read_table(victim).slice(0, 5)
    __import__("pyarrow.parquet").parquet.write_table(table, victim)
    with pytest.raises(SarError, match=rf"{os.path.basename(victim)}: 5 rows, the manifest says 16"):
        list(s.batches(0, 0))
    assert rewritten["shards"]  # the manifest itself still lists the shard: the reader caught it


def test_the_stream_on_s3_reads_the_training_columns_only_in_the_planned_requests(s3_bucket):
    """On an object store each piece costs one footer read and one ranged read of its row group's training
    columns: the count `sar plan` quotes (at most 2 a shard and 2 a cut between workers)."""
    from pipelines.core import storage

    url = f"{s3_bucket}/latents"
    make_synthetic_latents(url, 200, shard_rows=64)
    s = LatentStream.from_manifest(url, latents.read_manifest(url), latents.TRAIN_COLUMNS, micro_batch=8,
                                   rows_per_step=16, world=2, seed=0)
    fs = storage.filesystem(url)[0]
    real, reads = fs.cat_file, []
    fs.cat_file = lambda path, start=None, end=None, **kw: reads.append(end - start) or real(path, start=start, end=end, **kw)
    try:
        rows = sum(len(b["label"]) for rank in range(2) for b in s.batches(0, rank))
    finally:
        del fs.cat_file
    assert rows == s.steps_per_epoch * s.global_batch == 192
    assert len(reads) == 2 * sum(len(s.pieces(0, rank)) for rank in range(2)) <= 2 * len(s.urls) + 2 * (s.world - 1)
    # The data reads cover the training columns' chunks alone: the key and the token-order copy stay in the store.
    chunks = {}
    for url in s.urls:
        with fs.open(storage.filesystem(url)[1]) as f:
            group = pq.read_metadata(f).row_group(0)
        chunks[url] = {group.column(j).path_in_schema.split(".")[0]: group.column(j).total_compressed_size
                       for j in range(group.num_columns)}
    pieces = [p for rank in range(2) for p in s.pieces(0, rank)]
    data = sum(reads[1::2])
    assert data == sum(n for p in pieces for c, n in chunks[s.urls[p.shard]].items() if c in latents.TRAIN_COLUMNS)
    assert data < 0.85 * sum(n for p in pieces for n in chunks[s.urls[p.shard]].values())


# The synthetic set -------------------------------------------------------------------------------------
def test_synthetic_latents_are_encode_shards_that_training_accepts(small_set, tmp_path):
    from jobs.config import load_config
    from pipelines.train import driver

    manifest = latents.read_manifest(small_set)
    assert manifest["num_rows"] == 600 and [s["rows"] for s in manifest["shards"]] == [64] * 9 + [24]
    assert manifest["dtype"] == "bfloat16" and manifest["grid"] == [16, 16] and manifest["token_dim"] == 16
    assert set(manifest["columns"]) == {"key", "label", "mean", "mean_flip", "logvar", "logvar_flip", "tokens"}
    assert manifest["num_classes"] == 1000
    cfg = load_config("configs/imagenet256-sar-b-klvae.yaml", [f"encode.output={small_set}"])
    latents.check_encode_settings(manifest, cfg.encode, small_set)  # kl-vae, 256 px, patch 1, scale 0.2325
    driver.check_dataset(manifest, driver.build_model_config(cfg.model, manifest), small_set)
    # The same seed and shard size make the same rows; the dataset is refused as a target unless forced.
    again = str(tmp_path / "again")
    make_synthetic_latents(again, 600, shard_rows=64, seed=3)
    a, b = latents.load_arrays(small_set, KEYED), latents.load_arrays(again, KEYED)
    assert all(np.array_equal(a[c], b[c]) for c in KEYED)
    with pytest.raises(SarError, match="already holds a latents dataset .600 rows.; remove it or pass --force"):
        make_synthetic_latents(again, 10)
    make_synthetic_latents(again, 10, force=True)
    assert latents.read_manifest(again)["num_rows"] == 10 and len(os.listdir(again)) == 3  # shard, manifest, sources


def test_sar_synth_latents_writes_and_refuses_bad_arguments(tmp_path, capsys):
    from jobs.cli import main

    out = str(tmp_path / "latents")
    assert main(["synth-latents", out, "--rows", "40", "--shard-rows", "16", "--classes", "10"]) == 0
    assert "wrote 40 rows of KL-16 latents in 3 shards" in capsys.readouterr().out
    assert Counter(latents.load_arrays(out, ["label"])["label"].tolist()).keys() <= set(range(10))
    assert main(["synth-latents", str(tmp_path / "x"), "--rows", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sar synth-latents: error: --rows") and err.count("\n") == 1
    assert main(["synth-latents", out, "--rows", "40"]) == 1
    assert "already holds a latents dataset" in capsys.readouterr().err
    assert latents.read_manifest(out)["num_rows"] == 40  # nothing lost


# The training loop on two Ray Train workers --------------------------------------------------------------
ROWS, SHARD, MICRO, STEPS, EVERY, FAIL_AFTER = 1200, 128, 16, 78, 20, 45


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory, ray_local):
    """`sar pretrain` on 2 CPU Train workers streaming a 1,200-row KL-16 set (a one-block model, micro-batches
    of 16: 37 steps an epoch, 16 rows left out of each) for 78 steps, two epochs and a bit. The last worker
    dies after step 45 (epoch 1, its 8th step); Ray Train restarts the group, which resumes from the
    checkpoint of step 40. Every micro-batch's keys are written down with its data position and process."""
    import functools

    import ray.train  # noqa: F401

    from jobs import pretrain
    from jobs.config import load_config
    from pipelines.train import driver
    from tests.conftest import DEMO_CONFIG

    root = tmp_path_factory.mktemp("stream-run")
    data = str(root / "latents")
    make_synthetic_latents(data, ROWS, shard_rows=SHARD, seed=5)
    trace = root / "trace"
    trace.mkdir()
    marker = root / "failed-once"
    cfg = load_config(DEMO_CONFIG, [
        f"run_dir={root / 'run'}", f"encode.output={data}", "encode.encoder=kl-vae", "encode.image_size=256",
        "encode.patch=null", "encode.scale_factor=0.2325", "data.hflip=true", "data.reader=stream",
        "data.shuffle_buffer_rows=200", "model.overrides={depth: 1, hidden_size: 32, num_heads: 2, head_depth: 1, "
        "head_width: 32, head_batch_mul: 1}", f"pretrain.steps={STEPS}", f"pretrain.checkpoint_every={EVERY}",
        "pretrain.num_workers=2", f"pretrain.micro_batch={MICRO}", f"pretrain.global_batch={2 * MICRO}",
        "pretrain.log_every=10", "pretrain.max_failures=1", "pretrain.cpus_per_worker=0.5",
        "pretrain.optim.warmup_steps=2", "tracking.backend=none"])
    env = {"SAR_FAIL_AT_STEP": str(FAIL_AFTER), "SAR_FAIL_MARKER": str(marker)}
    os.environ.update(env)
    trace_dir = str(trace)

    def traced(config):
        """The loop, with the key column read too and each step's keys written down with its position."""
        import json as _json
        import os as _os

        import ray.train as _rt

        from pipelines.train import worker

        loop = config["loop"]
        stream = dataclasses.replace(loop.stream, columns=("key", *loop.stream.columns),
                                     shapes={"key": (), **loop.stream.shapes})
        real = worker.step_batches
        rank = _rt.get_context().get_world_rank()

        def recording(shard, train, st, rank_, accum):
            for micro in real(shard, train, st, rank_, accum):
                with open(_os.path.join(trace_dir, f"rank{rank}-{_os.getpid()}.jsonl"), "a") as f:
                    f.write(_json.dumps({"epoch": st.epoch, "batch": st.batch_in_epoch,
                                         "keys": [k for b in micro for k in b["key"]]}) + "\n")
                yield micro

        worker.step_batches = recording
        worker.train_loop(dataclasses.replace(loop, stream=stream))

    real_run = driver.run_training
    driver.run_training = functools.partial(real_run, loop_per_worker=traced)
    try:
        assert pretrain.main(cfg) == 0
    finally:
        driver.run_training = real_run
        for k in env:
            os.environ.pop(k, None)
    records = []
    for name in sorted(os.listdir(trace)):
        with open(trace / name) as f:
            records += [{**json.loads(line), "rank": int(name[4]), "attempt": name} for line in f]
    manifest = latents.read_manifest(data)
    return dict(cfg=cfg, marker=marker, records=records, manifest=manifest,
                stream=driver.latent_stream(cfg, "pretrain", manifest, {"columns": manifest["columns"]}))


@pytest.mark.ray
@pytest.mark.slow
def test_exactly_once_per_epoch_with_two_train_workers_and_a_restart(two_worker_run):
    run = two_worker_run
    s, records = run["stream"], run["records"]
    assert run["marker"].exists()  # the worker died once...
    attempts = {r["attempt"] for r in records}
    assert len(attempts) == 4  # ...so each rank ran in two processes
    # The restarted group began at the checkpoint before the kill (step 40: epoch 1, batch 3) and read the
    # same rows, in the same order, for the steps it took again.
    by_position = {}
    for r in records:
        by_position.setdefault((r["epoch"], r["batch"], r["rank"]), []).append(r["keys"])
    per_epoch = s.steps_per_epoch
    assert per_epoch == 37
    again = sorted({p[:2] for p, v in by_position.items() if len(v) > 1})
    # Steps 41-45 again; the worker that lived may have drawn step 46's batch before the group stopped.
    assert again[:5] == [divmod(step, per_epoch) for step in range(40, FAIL_AFTER)]
    assert again[5:] in ([], [divmod(FAIL_AFTER, per_epoch)])
    assert all(v[0] == v[1] for v in by_position.values() if len(v) > 1)
    # What the final weights saw: each complete epoch delivered every planned row once across the workers,
    # and left out the same number of others.
    starts = np.cumsum([0, *s.rows])
    final = {p: v[-1] for p, v in by_position.items()}
    for epoch in range(STEPS // per_epoch):
        seen = [k for (e, _, _), ks in final.items() if e == epoch for k in ks]
        assert len(seen) == len(set(seen)) == per_epoch * s.global_batch
        planned = {f"synthetic/{starts[i] + r:09d}" for rank in range(2) for i, r in s.row_ids(epoch, rank)}
        assert set(seen) == planned and ROWS - len(planned) == ROWS % s.global_batch == 16
    assert final[(0, 0, 0)] != final[(1, 0, 0)]  # the order differs between epochs
    assert sorted(b for (e, b, rank) in final if e == 2 and rank == 0) == list(range(STEPS - 2 * per_epoch))


@pytest.mark.ray
@pytest.mark.slow
def test_exactly_once_run_trains_and_records_its_position(two_worker_run):
    from pipelines.train import checkpoints

    cfg = two_worker_run["cfg"]
    assert checkpoints.list_steps(cfg.pretrain_dir)[-1] == STEPS
    state, _ = checkpoints.load_state(checkpoints.find_latest(cfg.pretrain_dir))
    spe = two_worker_run["stream"].steps_per_epoch
    assert (state["data"]["epoch"], state["data"]["batch_in_epoch"]) == divmod(STEPS, spe)
    rows = [json.loads(line) for line in open(os.path.join(cfg.pretrain_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(10, STEPS + 1, 10)) + ([STEPS] if STEPS % 10 else [])

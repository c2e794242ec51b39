"""The training reader at size: rows/s as torch tensors, per worker and per CPU core, against what SAR-B/L/H need.

    nice -n 5 uv run python -u benchmarks/latents_reader.py --root /work/scratch-23 [--rows 200000] [--s3-rows 8000]
    uv run python benchmarks/latents_reader.py --only flops      # the kl16 encoder's FLOPs (pipelines/train/plan.py)

Setup: `sar synth-latents` sets (pipelines/data/synth_latents.py: ImageNet's KL-16 shape, bf16, the
encode stage's shards and manifest) under --root, made once and reused: --rows rows in shards of
1,024 (~6 GB at 200k), and small sets for the knobs; a smaller set on S3, moto's server started by
this script as its own process on loopback (its CPU is not the reader's).

Each measurement runs in a fresh process (spawn) that reads whole epochs with the training reader
(pipelines/data/stream.py: LatentStream.batches, micro-batches of 64 rows as torch tensors, the
training columns), and reports its wall time, the CPU time of all its threads (the reader's
background thread and the consumer), its peak RSS over what it held before the first batch (/proc: VmHWM restarted), and
the reads it issued. Figures:

  rows/s per worker    rows delivered / wall seconds of that worker
  rows/s per CPU core  rows delivered / CPU seconds it spent: what a core can feed, load aside
  cold                 the shards' pages dropped from the page cache first (posix_fadvise
                       DONTNEED on each file: only this script's files), so they come from the disk

Then the knobs (shard rows, storage dtype, column projection, prefetch) on small sets, Ray Data's
streaming read of the same rows as `streaming_split` serves a Train worker (the path this reader
replaces; its CPU counted over every process of the Ray instance it starts), and the rates the
models need per GPU (pipelines/train/plan.py: SAR-B measured, L and H from their FLOPs).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MICRO = 64


def load() -> str:
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def dataset(root: str, name: str, rows: int, **kw) -> str:
    """A synthetic latents set under root/name, made when missing."""
    from pipelines.data.latents import MANIFEST, read_manifest
    from pipelines.data.synth_latents import make_synthetic_latents

    url = root if "://" in root else os.path.join(root, name)
    if "://" not in url and os.path.exists(os.path.join(url, MANIFEST)) and read_manifest(url)["num_rows"] == rows:
        return url
    summary = make_synthetic_latents(url, rows, force=True, workers=os.cpu_count() or 1, **kw)
    print(f"  made {name}: {summary.line()}", flush=True)
    return url


def memory() -> dict[str, int]:
    """This process's resident set (VmRSS) and its peak (VmHWM), bytes."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def _measure(url: str, spec: dict, out) -> None:
    """Child process: read `spec['epochs']` epochs of rank `spec['rank']` and report the figures."""
    import torch

    from pipelines.core import storage
    from pipelines.data import stream
    from pipelines.data.latents import read_manifest

    torch.set_num_threads(1)
    manifest = read_manifest(url)
    if spec.get("shards"):
        manifest = {**manifest, "shards": manifest["shards"][: spec["shards"]]}
    s = stream.LatentStream.from_manifest(url, manifest, spec["columns"], micro_batch=MICRO,
                                          rows_per_step=MICRO, world=spec["world"], seed=0,
                                          buffer_rows=spec.get("buffer", 4096))
    if spec.get("cold"):
        for u in s.urls:
            fd = os.open(u, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    t0 = time.perf_counter()
    s.read_piece(stream.Piece(0, 0, 1))  # start-up (imports, Arrow's memory pool), not timed
    startup = time.perf_counter() - t0
    reads = [0, 0]
    fs = storage.filesystem(url)[0]  # the instance the reader gets (fsspec caches it): count its ranged reads
    real = fs.cat_file

    def counted(path, start=None, end=None, **kw):
        data = real(path, start=start, end=end, **kw)
        reads[0] += 1
        reads[1] += len(data)
        return data

    fs.cat_file = counted
    with open("/proc/self/clear_refs", "w") as f:  # restart the peak RSS (VmHWM) from what is held now
        f.write("5")
    base = memory()["VmRSS"]
    rows, cpu0, t0 = 0, time.process_time(), time.perf_counter()
    for epoch in range(spec["epochs"]):
        for batch in s.batches(epoch, spec["rank"], prefetch=spec.get("prefetch", 1)):
            rows += len(batch["label"])
    out.put({"rows": rows, "wall": time.perf_counter() - t0, "cpu": time.process_time() - cpu0,
             "rss": memory()["VmHWM"] - base, "reads": reads[0],
             "read_bytes": reads[1], "dataset_rows": s.num_rows, "startup": startup})


def measure(url: str, workers: int = 1, **spec) -> list[dict]:
    """Run `workers` reader processes at once (ranks of one world) and collect their figures."""
    from pipelines.data.latents import TRAIN_COLUMNS

    spec.setdefault("columns", list(TRAIN_COLUMNS))
    spec.setdefault("epochs", 1)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_measure, args=(url, {**spec, "rank": r, "world": workers}, q)) for r in range(workers)]
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return results


def show(label: str, results: list[dict]) -> dict:
    rows = sum(r["rows"] for r in results)
    wall = max(r["wall"] for r in results)
    cpu = sum(r["cpu"] for r in results)
    line = {"label": label, "per_worker": rows / len(results) / wall, "per_core": rows / cpu, "total": rows / wall,
            "rss": max(r["rss"] for r in results), "reads": sum(r["reads"] for r in results),
            "read_bytes": sum(r["read_bytes"] for r in results), "rows": rows}
    print(f"  {label:44s} {line['per_worker']:8,.0f} rows/s per worker {line['per_core']:8,.0f} per CPU core"
          f"  ({len(results)} worker{'s' if len(results) > 1 else ''}, {rows:,} rows, {wall:.1f} s, CPU {cpu:.1f} s, "
          f"peak RSS +{line['rss'] / 2**20:.0f} MiB" + (f", {line['reads']:,} ranged reads of "
                                                       f"{line['read_bytes'] / 1e9:.2f} GB" if line["reads"] else "")
          + f"; start-up {max(r['startup'] for r in results):.1f} s, not counted)", flush=True)
    return line


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of the living descendants of `pid` (a Ray instance's processes), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    parents, cpu = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(name)] = int(fields[1])
        cpu[int(name)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        total += sum(cpu[c] for c in kids)
        todo += kids
    return total


def ray_data(url: str, shards: int) -> dict:
    """One epoch through Ray Data as a single Train worker reads it (the loop's former path)."""
    import ray

    from pipelines.data.latents import TRAIN_COLUMNS, read_manifest

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        manifest = read_manifest(url)
        manifest = {**manifest, "shards": manifest["shards"][:shards]}
        ds = ray.data.read_parquet([os.path.join(url, s["file"]) for s in manifest["shards"]]).select_columns(
            list(TRAIN_COLUMNS))
        shard = ds.streaming_split(1, equal=True)[0]
        t0 = time.perf_counter()
        rows, first = 0, None
        for batch in shard.iter_torch_batches(batch_size=MICRO, drop_last=True, prefetch_batches=2,
                                              local_shuffle_buffer_size=4 * MICRO, local_shuffle_seed=0):
            if first is None:  # the read tasks' start-up: from here on, the steady rate
                first = time.perf_counter()
                cpu0, kids0 = time.process_time(), tree_cpu_seconds(os.getpid())
            else:
                rows += len(batch["label"])
        wall = time.perf_counter() - first
        cpu = time.process_time() - cpu0 + tree_cpu_seconds(os.getpid()) - kids0
    finally:
        ray.shutdown()
    line = {"per_worker": rows / wall, "per_core": rows / cpu}
    print(f"  {'Ray Data streaming_split(1), iter_torch_batches':44s} {line['per_worker']:8,.0f} rows/s per worker "
          f"{line['per_core']:8,.0f} per CPU core  ({rows:,} rows after the first batch, {wall:.1f} s, CPU {cpu:.1f} s "
          f"over the driver and every Ray process; {first - t0:.1f} s to the first batch, not counted)", flush=True)
    return line


def moto_server() -> tuple[subprocess.Popen, str]:
    """moto's S3 as its own process on loopback; the AWS variables point this process (and its children) at it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1"})
    import urllib.request

    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    return proc, endpoint


def flops() -> None:
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    # MAR's kl16 shape: 5 levels (128, 128, 256, 256, 512), 2 ResNet blocks each, 16 latent channels, stride 16.
    vae = AutoencoderKL(block_out_channels=(128, 128, 256, 256, 512), down_block_types=("DownEncoderBlock2D",) * 5,
                        up_block_types=("UpDecoderBlock2D",) * 5, latent_channels=16, layers_per_block=2)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.encode(torch.randn(1, 3, 256, 256))
    print(f"kl16 encoder, one 256 px image: {counter.get_total_flops() / 1e9:.1f} GFLOP")


def needs() -> None:
    """What each model needs per GPU, and the reader's share of a core."""
    from models import preset_config, train_flops_per_image
    from pipelines.train import plan

    b = plan.measured_flops()
    print("\nwhat training needs per GPU (pipelines/train/plan.py):")
    for preset in ("sar-b", "sar-l", "sar-h"):
        f = train_flops_per_image(plan.meta_model(preset_config(preset, **plan.MEASURED_SPACE).to_dict()))
        rate = plan.train_rate(f, b, None)
        print(f"  {preset}: {rate.value:6.1f} images/s per GPU ({rate.source.split(':')[0]}); a node of 8: "
              f"{8 * rate.value:,.0f} rows/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/tmp/sar-bench-reader", help="where the local sets are made and kept")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--knob-rows", type=int, default=16_384, help="rows of each knob's set")
    p.add_argument("--s3-rows", type=int, default=8_192)
    p.add_argument("--ray-rows", type=int, default=16_384, help="rows Ray Data reads (a prefix of the large set)")
    p.add_argument("--only", choices=["flops", "local", "knobs", "ray", "s3", "needs"], action="append")
    args = p.parse_args()
    only = set(args.only or ["local", "knobs", "ray", "s3", "needs", "flops"])
    t_start = time.perf_counter()
    print(f"latents reader benchmark, {os.cpu_count()} CPUs, {load()}", flush=True)
    if "flops" in only:
        flops()
    os.makedirs(args.root, exist_ok=True)
    if "local" in only or "ray" in only:
        print(f"\nlocal disk, {args.rows:,} rows:", flush=True)
        big = dataset(args.root, f"latents-{args.rows}", args.rows)
    if "local" in only:
        show("1 worker, one epoch, cold", measure(big, cold=True))
        show("1 worker, one epoch, warm", measure(big))
        show("2 workers at once (ranks of 2), one epoch", measure(big, workers=2))
        small = max(1, args.rows // 10 // 1024)
        show(f"1 worker, the first {small} shards (memory: the same bound)", measure(big, shards=small))
        show("1 worker, one epoch, buffer of 1,024 rows", measure(big, buffer=1024))
    if "knobs" in only:
        print(f"\nknobs, {args.knob_rows:,} rows each, 1 worker, warm (the defaults: shards of 1,024, bfloat16, "
              "training columns, 1 window prefetched):", flush=True)
        base = dataset(args.root, f"knob-{args.knob_rows}-1024", args.knob_rows)
        show("defaults", measure(base))
        for rows in (256, 4096):
            show(f"shards of {rows:,} rows", measure(dataset(args.root, f"knob-{args.knob_rows}-{rows}", args.knob_rows,
                                                             shard_rows=rows)))
        show("float32 storage", measure(dataset(args.root, f"knob-{args.knob_rows}-f32", args.knob_rows,
                                                dtype="float32")))
        show("every column (no projection)", measure(base, columns=["key", "label", "mean", "mean_flip",
                                                                               "logvar", "logvar_flip", "tokens"]))
        show("no prefetch", measure(base, prefetch=0))
        show("buffer of 1,024 rows", measure(base, buffer=1024))
    if "ray" in only:
        print(f"\nRay Data, the first {args.ray_rows:,} rows of the large set, 1 worker:", flush=True)
        ray_data(big, args.ray_rows // 1024)
    if "s3" in only:
        print(f"\nS3 (moto's server, its own process on loopback), {args.s3_rows:,} rows:", flush=True)
        import boto3

        proc, endpoint = moto_server()
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            url = dataset("s3://bench/latents", "s3", args.s3_rows)
            show("1 worker, one epoch", measure(url))
            lines = show("2 workers at once (ranks of 2), one epoch", measure(url, workers=2))
            from pipelines.data import latents

            m = latents.read_manifest(url)
            planned = 2 * len(m["shards"]) + 2 * (2 - 1)
            print(f"  ranged reads in the epoch of 2 workers: {lines['reads']:,}; `sar plan` says at most {planned:,} "
                  "(a footer and a ranged read a shard, 2 more a cut between workers inside a shard)", flush=True)
        finally:
            proc.terminate()
            proc.wait()
    if "needs" in only:
        needs()
    print(f"\n{load()}; {time.perf_counter() - t_start:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()

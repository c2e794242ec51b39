"""The training input pipeline's overhead: Ray Data from Parquet latents vs batches held in memory.

    uv run python benchmarks/train_input_pipeline.py [--preset tiny] [--image-size 32] [--patch 4]
        [--batch 32] [--steps 20] [--warmup 5] [--rounds 3] [--storage-dtype float16]

Setup: a synthetic ImageNet (pipelines/data/synth.py) encoded by `sar encode` (jobs/encode.py, raw
pixel tokens from configs/demo.yaml) into a temporary latents folder, sized so that one epoch
is exactly `warmup + steps` batches; a local Ray on 2 CPUs.

Both sides run the training loop's own step (pipelines/train/worker.py: `prepare` builds the model,
optimizer, schedule and EMA of a pretrain run, `train_step` makes one optimizer step from a
batch of latent rows), in this process, on the same model; bf16 autocast on CUDA, as the loop.

  ray data   each round is one epoch of the dataset as a Ray Train worker sees it: the
             `streaming_split(1, equal=True)` shard that Ray Train hands a single worker,
             read through the loop's `step_batches`;
  in memory  the batches of a first (untimed) epoch, kept as a list of torch tensors.

The sides alternate (ray data, in memory, ray data, ...) so that the load of a shared machine
falls on both alike. The first `warmup` steps of every round are not timed (an epoch's
start-up, the prefetch buffer filling). Printed: ms/step of each side (mean over the timed
steps, and the median), the overhead of the Ray Data side in % of the in-memory step, and the
time the loop waited in `next()` for a batch, the part of the overhead that data loading
causes directly. On CUDA the defaults switch to SAR-B on a 16x16 token grid and the in-memory
side's images/s and model FLOPs utilisation are printed as well.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # workers use this interpreter, not `uv run`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from bench_models import PEAK_BF16_FLOPS, train_flops_per_image  # noqa: E402

from jobs.config import load_config  # noqa: E402
from jobs.stages import StageOptions  # noqa: E402
from models import count_parameters  # noqa: E402
from pipelines.data.latents import TRAIN_COLUMNS  # noqa: E402
from pipelines.train import checkpoints, driver, worker  # noqa: E402
from pipelines.train.loop_config import LoopConfig  # noqa: E402


def make_latents(root: str, args) -> tuple:
    """Synthesise and encode `(warmup + steps) * batch` images; return (config, dataset, manifest)."""
    from jobs import encode
    from pipelines.data.latents import open_latents
    from pipelines.data.synth import make_synthetic_imagenet

    rows = (args.warmup + args.steps) * args.batch
    per_class = math.ceil(rows / args.classes)
    t0 = time.perf_counter()
    make_synthetic_imagenet(os.path.join(root, "imagenet"), classes=args.classes, per_class=per_class,
                            size=args.image_size, seed=0, val_per_class=0)
    cfg = load_config("configs/demo.yaml", [
        f"run_dir={root}", f"data.source={root}/imagenet", f"encode.image_size={args.image_size}",
        f"encode.patch={args.patch}", f"encode.storage_dtype={args.storage_dtype}",
        f"encode.shard_rows={args.shard_rows}", f"model.preset={args.preset}",
        f"pretrain.micro_batch={args.batch}", f"pretrain.global_batch={args.batch}", "pretrain.optim.warmup_steps=0",
        "cluster.num_cpus=2"])
    encode.main(cfg, StageOptions(force=True))
    dataset, manifest = open_latents(cfg.latents_dir)
    columns = [c for c in TRAIN_COLUMNS if c in manifest["columns"]]
    print(f"latents: {manifest['num_rows']} rows in {len(manifest['shards'])} shards, grid {manifest['grid']} x "
          f"{manifest['token_dim']} ({args.storage_dtype}), made in {time.perf_counter() - t0:.1f} s")
    return cfg, dataset.select_columns(columns), manifest  # as run_training: token-order copies stay on disk


def build_step(cfg, manifest, device: torch.device):
    """(model, step(micro-batches) -> None): one optimizer step of the training loop."""
    train = cfg.pretrain
    torch.manual_seed(train.seed)
    model_config = driver.build_model_config(cfg.model, manifest)
    section = driver.resolve_length(train, manifest["num_rows"])
    loop = LoopConfig(stage="pretrain", stage_dir=cfg.pretrain_dir, train=section, model_config=model_config,
                      token_space=checkpoints.token_space(manifest), inputs={}, run_config={},
                      use_gpu=device.type == "cuda", accum=1, hflip=cfg.data.hflip)
    t, _ = worker.prepare(loop, device)
    gen = torch.Generator().manual_seed(train.seed)

    def step(micro: list[dict[str, torch.Tensor]]) -> None:
        worker.train_step(t, micro, gen, {})
        if device.type == "cuda":
            torch.cuda.synchronize()  # the step's time is the device's, not the launch's

    return t.model, step


def run_steps(batches, step, warmup: int, steps: int) -> tuple[list[float], list[float], float]:
    """Wall times of the timed steps, their waits for a batch (seconds), and the CPU seconds this
    process spent over them (all its threads: torch's and Ray Data's prefetching); the epoch is drained."""
    it = iter(batches)
    times, waits, cpu = [], [], 0.0
    for i in range(warmup + steps):
        c0, t0 = time.process_time(), time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        step(batch)
        t2, c2 = time.perf_counter(), time.process_time()
        if i >= warmup:
            times.append(t2 - t0)
            waits.append(t1 - t0)
            cpu += c2 - c0
    for _ in it:  # end the epoch (the rows that make no full batch), untimed
        pass
    return times, waits, cpu


def load_average() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sar-b" if cuda else "tiny")
    p.add_argument("--image-size", type=int, default=64 if cuda else 32, help="pixels; raw tokens")
    p.add_argument("--patch", type=int, default=4, help="pixels per token side (grid = image-size / patch)")
    p.add_argument("--batch", type=int, default=64 if cuda else 32, help="micro-batch per step")
    p.add_argument("--steps", type=int, default=50 if cuda else 12, help="timed steps per round and side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every round")
    p.add_argument("--rounds", type=int, default=5, help="alternations of the two sides")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--storage-dtype", default="float16", choices=["float16", "float32"],
                   help="the latents' Parquet dtype (float16 is encode's default)")
    p.add_argument("--shard-rows", type=int, default=256, help="rows per Parquet shard")
    args = p.parse_args()

    import ray

    device = torch.device("cuda" if cuda else "cpu")
    print(f"train input pipeline benchmark: {torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs, "
          f"device {torch.cuda.get_device_name() if cuda else 'cpu'}")
    print(f"load: {load_average()}")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no progress lines between the figures
    with tempfile.TemporaryDirectory(prefix="sar-bench-input-") as root:
        cfg, dataset, manifest = make_latents(root, args)
        model, step = build_step(cfg, manifest, device)
        g = model.grouping
        print(f"model: {args.preset}, {count_parameters(model) / 1e6:.2f}M parameters, {g.name} "
              f"({g.num_groups} groups, L={g.seq_len}), batch {args.batch}, {args.warmup} warm-up + {args.steps} "
              f"timed steps x {args.rounds} rounds per side")

        # The shard one Ray Train worker reads (DataConfig.configure: streaming_split(world_size, equal=True)).
        shard = dataset.streaming_split(1, equal=True)[0]

        def epoch(e: int):  # the loop's batches of epoch e on rank 0, one micro-batch per step
            return ([b] for b in worker.epoch_batches(shard, cfg.pretrain, e, rank=0))

        t0 = time.perf_counter()
        in_memory = list(epoch(0))  # the untimed first epoch: kernels, allocator, Ray Data's start
        for b in in_memory[:args.warmup]:
            step(b)
        print(f"first epoch ({len(in_memory)} batches) kept in memory, {args.warmup} warm-up steps: "
              f"{time.perf_counter() - t0:.1f} s")
        ray_t, ray_w, mem_t, mem_w, ray_cpu, mem_cpu = [], [], [], [], 0.0, 0.0
        for r in range(args.rounds):
            t, w, c = run_steps(epoch(r + 1), step, args.warmup, args.steps)
            ray_t, ray_w, ray_cpu = ray_t + t, ray_w + w, ray_cpu + c
            t, w, c = run_steps(in_memory, step, args.warmup, args.steps)
            mem_t, mem_w, mem_cpu = mem_t + t, mem_w + w, mem_cpu + c
            print(f"  round {r + 1}: ray data {statistics.fmean(ray_t[-args.steps:]) * 1e3:7.1f} ms/step, "
                  f"in memory {statistics.fmean(mem_t[-args.steps:]) * 1e3:7.1f} ms/step")

        ray_ms, mem_ms = statistics.fmean(ray_t) * 1e3, statistics.fmean(mem_t) * 1e3
        ray_med, mem_med = statistics.median(ray_t) * 1e3, statistics.median(mem_t) * 1e3
        wait_ms = statistics.fmean(ray_w) * 1e3
        ray_cms, mem_cms = ray_cpu / len(ray_t) * 1e3, mem_cpu / len(mem_t) * 1e3
        print(f"\n{'':12s}{'mean ms/step':>14s}{'median':>10s}{'wait ms':>10s}{'CPU ms':>10s}"
              f"   ({len(ray_t)} timed steps each; CPU: this process, all threads)")
        print(f"{'ray data':12s}{ray_ms:14.1f}{ray_med:10.1f}{wait_ms:10.2f}{ray_cms:10.1f}")
        print(f"{'in memory':12s}{mem_ms:14.1f}{mem_med:10.1f}{statistics.fmean(mem_w) * 1e3:10.2f}{mem_cms:10.1f}")
        overhead = (ray_ms - mem_ms) / mem_ms * 100
        print(f"overhead of the ray data step: {overhead:+.1f}% (means), {(ray_med - mem_med) / mem_med * 100:+.1f}% "
              f"(medians); goal <= 3%: {'met' if overhead <= 3 else 'missed'} by the means")
        print(f"waiting for batches (next() on the iterator): {wait_ms / mem_ms * 100:.1f}% of the in-memory step; "
              f"the rest of the difference is the step itself running slower beside Ray Data's threads and "
              f"workers (or the machine's load)")
        print(f"CPU per step in this process: {(ray_cms - mem_cms) / mem_cms * 100:+.1f}% on the ray data side "
              f"(a figure the machine's load disturbs less than wall time)")

        if not cuda:
            print("images/s and MFU: skipped: no CUDA")
        else:
            # Training FLOPs per image (benchmarks/bench_models.py): 6 x backbone parameters x S
            # positions (S = 1 + 2 L: the class token and both streams of the one-pass layout),
            # + attention 12 x depth x S^2 x width, + 6 x head parameters x L x head_batch_mul.
            ips = args.batch / (mem_ms / 1e3)
            name = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
            flops = train_flops_per_image(model)
            mfu = f"{flops * ips / peak * 100:.1f}%" if peak else "n/a (unknown peak)"
            print(f"{args.preset} (bf16, {name}): {ips:.0f} images/s in memory, "
                  f"{args.batch / (ray_ms / 1e3):.0f} through Ray Data; {flops / 1e9:.1f} GFLOP/image; MFU {mfu}")
    print(f"load: {load_average()}")
    ray.shutdown()


if __name__ == "__main__":
    main()

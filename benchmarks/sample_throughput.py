"""Sampling throughput: images per second of `sar sample`'s work, and what 50,000 would take.

    uv run python benchmarks/sample_throughput.py [--images 96] [--batch 16] [--actors 2]
        [--cuda-batch 256] [--cuda-images 1024] [--flow-steps 50]

CPU: the tiny preset on the demo's token space (raw 32 px pixels, 8x8 tokens, next-neighbour,
15 steps, x-CFG + z-CFG), generate + decode + PNG write, in a plain loop in this process and
on the Ray Data actor pool of `sar sample` (a local Ray; actor start-up included).
CUDA: SAR-B (16x16 KL-VAE tokens, next-neighbour: 31 steps) with CFG, bf16 autocast,
generate + KL-VAE decode (a randomly initialised kl16-shaped AutoencoderKL: the cost is the
architecture's, not the weights'), images/s and the projected time for 50,000 samples.
Skipped with a message when there is no GPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from models import Guidance, build_model
from pipelines.evaluate import sampling
from pipelines.train import checkpoints

RAW_32 = {"encoder": "raw", "weights": None, "weights_sha256": None, "scale_factor": None, "image_size": 32,
          "grid": [8, 8], "channels": 3, "patch": 4, "token_dim": 48, "grouping": "next-neighbour",
          "scales": None, "num_classes": 10, "schema_version": 1}


def tiny_checkpoint(root: str) -> str:
    torch.manual_seed(0)
    model = build_model("tiny", token_dim=48, height=8, width=8, num_classes=10)
    meta = {"step": 1, "stage": "pretrain", "model_config": model.config.to_dict(), "latents": RAW_32}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints.write_local(tmp, {"model": model.state_dict(), "ema": model.state_dict()}, meta)
        return checkpoints.publish(tmp, os.path.join(root, "pretrain"), 1, keep=1)


def kl16_codec(levels: tuple[int, ...] = (128, 128, 256, 256, 512), grid: int = 16):
    """A randomly initialised AutoencoderKL of MAR's kl16 shape (5 levels of `levels` channels, 16
    latent channels, stride 16) as the codec of `grid` x `grid` tokens: the decode's cost is the
    architecture's, not the weights'. Smaller `levels` make a tiny one for CPU runs."""
    from diffusers import AutoencoderKL

    from pipelines.data.codecs import KLVAECodec

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * len(levels),
                        up_block_types=("UpDecoderBlock2D",) * len(levels),
                        block_out_channels=levels, layers_per_block=2, norm_num_groups=min(32, levels[0]))
    return KLVAECodec(vae, grid * 2 ** (len(levels) - 1), 1, 0.2325, None)


def cpu_benchmark(images: int, batch: int, actors: int, flow_steps: int) -> None:
    from jobs import sample as sample_job
    from jobs.config import load_config  # here, not at the top: the GPU machine's image has no pydantic
    from pipelines.core.ray_runtime import init_ray

    with tempfile.TemporaryDirectory(prefix="sar-bench-") as root:
        ckpt = tiny_checkpoint(root)
        per_class = -(-images // 10)
        cfg = load_config(None, [f"run_dir={root}", f"sample.per_class={per_class}", f"sample.batch_size={batch}",
                                 f"sample.num_actors={actors}", f"sample.flow_steps={flow_steps}",
                                 "sample.guidance.w_z=2.0", "cluster.num_cpus=2",
                                 "cluster.object_store_memory=300000000"])
        plan = sampling.SamplePlan(10, per_class, seed=0)
        settings = sample_job.settings(cfg)

        # Plain loop: the stage in this process, on one thread as a Ray actor with one CPU runs.
        torch.set_num_threads(1)
        stage = sampling.SampleGenerator(ckpt, os.path.join(root, "loop"), settings, plan)
        start = time.perf_counter()
        for i in range(0, plan.size, batch):
            stage(plan.rows(range(i, min(i + batch, plan.size))))
        loop_s = time.perf_counter() - start
        print(f"cpu  tiny (8x8 tokens, 15 steps, xz_cfg, {flow_steps} flow steps), {plan.size} images, batch {batch}, "
              f"on {os.cpu_count()} cores")
        print(f"     plain loop, 1 process x 1 thread: {plan.size / loop_s:6.1f} images/s  ({loop_s:.1f} s)")

        # The Ray Data actor pool, as `sar sample` runs it (actor start-up and model load included).
        init_ray(cfg.cluster)
        run = sampling.run_pool(ckpt, plan, settings, os.path.join(root, "pool"), list(range(plan.size)), actors, 0)
        print(f"     ray actor pool, {actors} actors x 1 CPU: {run.written / run.seconds:6.1f} images/s  "
              f"({run.seconds:.1f} s, of which {run.first_batch_s:.1f} s to the first batch: actor start-up); "
              f"{run.steady_rate:.1f} images/s after it")


def cuda_benchmark(images: int, batch: int, flow_steps: int, guidance: Guidance, sampler: dict) -> None:
    if not torch.cuda.is_available():
        print("cuda SAR-B benchmark skipped: no CUDA device here (run this script on a GPU machine)")
        return
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("sar-b", token_dim=16, height=16, width=16, num_classes=1000).to(device).eval()
    codec = kl16_codec().to(device).eval()
    steps = model.grouping.num_groups
    labels = torch.arange(batch, device=device) % 1000

    def run(n_batches: int) -> int:
        made = 0
        for b in range(n_batches):
            out = sampling.render(model, codec, labels.cpu().numpy(), range(b * batch, (b + 1) * batch), guidance,
                                  flow_steps, device, sampler)
            made += len(out)
        torch.cuda.synchronize()
        return made

    t0 = time.perf_counter()
    run(1)  # warm-up: kernels, allocator, compilation
    print(f"     warm-up batch (compilation included): {time.perf_counter() - t0:.1f} s")
    n_batches = max(1, images // batch)
    start = time.perf_counter()
    made = run(n_batches)
    secs = time.perf_counter() - start
    rate = made / secs
    print(f"cuda SAR-B ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M, {steps} AR steps, {guidance}, "
          f"{flow_steps} {sampler['solver']} flow steps{', compiled head' if sampler['compile_head'] else ''}, bf16), "
          f"batch {batch}, {made} images on {torch.cuda.get_device_name()}")
    print(f"     {rate:.1f} images/s; 50,000 images: {50_000 / rate / 60:.1f} min on one GPU "
          f"(generate + KL-VAE decode + uint8, no PNG writes)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=96, help="CPU: images per measurement")
    p.add_argument("--batch", type=int, default=16, help="CPU: batch size")
    p.add_argument("--actors", type=int, default=2, help="CPU: actor-pool size")
    p.add_argument("--flow-steps", type=int, default=50, help="Euler steps of the flow head (sample.flow_steps)")
    p.add_argument("--cuda-batch", type=int, default=256)
    p.add_argument("--cuda-only", action="store_true", help="skip the CPU actor-pool measurement")
    p.add_argument("--solver", default="euler", choices=["euler", "heun", "midpoint"], help="sample.solver")
    p.add_argument("--compile-head", action="store_true", help="sample.compile_head (CUDA graphs of the head's steps)")
    p.add_argument("--cuda-images", type=int, default=1024)
    p.add_argument("--guidance", default="xz_cfg", help="sample.guidance.kind on CUDA")
    p.add_argument("--w-x", type=float, default=1.35, help="x-CFG weight (SAR-B, self-token paper Table 4)")
    p.add_argument("--w-z", type=float, default=3.0, help="z-CFG weight (SAR-B, Table 4)")
    p.add_argument("--cfg", type=float, default=3.5, help="CFG scale (Table 2)")
    args = p.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not args.cuda_only:
        cpu_benchmark(args.images, args.batch, args.actors, args.flow_steps)
    cuda_benchmark(args.cuda_images, args.cuda_batch, args.flow_steps,
                   Guidance(args.guidance, cfg=args.cfg, w_x=args.w_x, w_z=args.w_z),
                   {"solver": args.solver, "temperature": 1.0, "compile_head": args.compile_head})


if __name__ == "__main__":
    main()

"""Throughput of the encoder stage: Ray Data actor pool vs the same encoder in a plain loop.

Both sides run `pipelines.data.encode.EncodeLatents` (image + flip -> token grids, grouping,
storage cast) over the same preprocessed uint8 images, with the same batch size. Printed per
encoder: images/s of the plain loop, of the Ray Data stage in steady state (first batch
start to last batch end, across actors: Ray Data's own overheads between batches count,
starting the actor pool does not), of the whole Ray Data execution including the pool's
start, and the ratio steady Ray / plain.

    uv run python benchmarks/encode_throughput.py --images 256 --image-size 64 --batch-size 32

`kl-vae` is a tiny random AutoencoderKL (no weights are downloaded); on a GPU machine pass
--kl-channels 128,128,256,256,512 for a kl16-sized model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from pipelines.data.encode import EncodeLatents
from pipelines.data.latents import ERROR, KEY, LABEL
from pipelines.data.preprocess import PIXELS, center_crop_arr
from pipelines.data.synth import render


def make_images(n: int, size: int) -> np.ndarray:
    """n synthetic images, centre-cropped to `size` as the encode stage would deliver them."""
    return np.stack([center_crop_arr(render(i % 10, i, size + size // 4, 0), size) for i in range(n)])


def make_tiny_vae(folder: str, channels: list[int]) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=channels, down_block_types=["DownEncoderBlock2D"] * len(channels),
                        up_block_types=["UpDecoderBlock2D"] * len(channels), latent_channels=16,
                        layers_per_block=1, scaling_factor=0.2325)
    vae.save_pretrained(folder)
    return folder


def batch_of(pixels: np.ndarray, start: int) -> dict[str, np.ndarray]:
    n = len(pixels)
    return {KEY: np.array([f"img{start + i}" for i in range(n)], dtype=object), LABEL: np.zeros(n, np.int64),
            PIXELS: pixels, ERROR: np.array([""] * n, dtype=object)}


def plain_loop(kwargs: dict, images: np.ndarray, batch_size: int) -> float:
    stage = EncodeLatents(**kwargs)
    stage(batch_of(images[:batch_size], 0))  # warm-up (allocator, kernels)
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        stage(batch_of(images[i:i + batch_size], i))
    return len(images) / (time.perf_counter() - start)


class TimedEncode(EncodeLatents):
    """EncodeLatents that also returns when each batch started and ended."""

    def __call__(self, batch):
        t0 = time.time()
        super().__call__(batch)
        n = len(batch[KEY])
        return {"t0": np.full(n, t0), "t1": np.full(n, time.time())}


def ray_stage(kwargs: dict, images: np.ndarray, batch_size: int, num_actors: int,
              cpus_per_actor: int) -> tuple[float, float]:
    import ray

    ds = ray.data.from_numpy(images).map_batches(
        lambda b: batch_of(b["data"], 0), batch_size=batch_size, batch_format="numpy")
    ds = ds.map_batches(TimedEncode, fn_constructor_kwargs=kwargs, batch_size=batch_size,
                        compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=cpus_per_actor,
                        batch_format="numpy")
    start = time.perf_counter()
    out = ds.to_pandas()
    total = time.perf_counter() - start
    steady = out["t1"].max() - out["t0"].min()
    return len(images) / steady, len(images) / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--num-cpus", type=int, default=2, help="local Ray's CPUs")
    p.add_argument("--cpus-per-actor", type=int, default=1, help="also the plain loop's torch threads")
    p.add_argument("--encoders", default="raw,kl-vae")
    p.add_argument("--kl-channels", default="32,32,64,64,64", help="AutoencoderKL block_out_channels")
    args = p.parse_args()

    import ray

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    # Ray gives an actor OMP_NUM_THREADS = its num_cpus; the plain loop gets the same threads.
    torch.set_num_threads(args.cpus_per_actor)
    images = make_images(args.images, args.image_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{args.images} images of {args.image_size} px, batch {args.batch_size}, {args.num_actors} actor(s), "
          f"device {device}, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        for encoder in args.encoders.split(","):
            kwargs = {"encoder": encoder, "weights": None, "image_size": args.image_size, "patch": None,
                      "scale_factor": None, "grouping": "next-neighbour", "scales": None,
                      "storage_dtype": "float16"}
            if encoder == "kl-vae":
                channels = [int(c) for c in args.kl_channels.split(",")]
                kwargs["weights"] = make_tiny_vae(os.path.join(tmp, "vae"), channels)
            loop = plain_loop(kwargs, images, args.batch_size)
            steady, total = ray_stage(kwargs, images, args.batch_size, args.num_actors, args.cpus_per_actor)
            print(f"{encoder:7s} plain loop {loop:9.1f} images/s | Ray Data stage {steady:9.1f} images/s "
                  f"(with actor start {total:7.1f}) | ratio {steady / loop:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()

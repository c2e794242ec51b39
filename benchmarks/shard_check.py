"""What checking a latents dataset's shards costs before a training run starts (and in `sar encode`'s
up-to-date check): the manifest's sizes and Parquet footer checksums against a whole-file sha256.

    uv run python benchmarks/shard_check.py                  # 16 shards of 1024 rows, kl-vae shapes
    uv run python benchmarks/shard_check.py --shards 4 --rows 256

The shards are written by the encode stage's own writer (`latents.write_shard`) from random values
in the reference token space (KL-VAE: 16x16 tokens of 16 dims; mean, its flip, both log-variances
and the token-order copy, float16), committed into a manifest, then checked two ways. The files
were just written, so the page cache holds them: the times are the reading code's, not a disk's;
on an object store the bytes read (and the requests) are what count.

  check_shards   latents.check_shards: one listing, one ranged read of each footer
  sha256         the whole of every file read and hashed, as a whole-file checksum would need

Printed: the shard and footer sizes, and each way's seconds per shard and bytes read.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from pipelines.data import latents as L  # noqa: E402

GRID, DIM = 16, 16  # the reference token space (DESIGN.md, section 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--rows", type=int, default=1024, help="rows per shard (encode.shard_rows)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    out = tempfile.mkdtemp(prefix="shard-check-", dir=os.environ.get("BENCH_DIR"))
    try:
        committer = L.Committer(out, {"schema_version": L.SCHEMA_VERSION}, None, set(), [])
        for i in range(args.shards):
            n = args.rows
            grid = lambda: rng.standard_normal((n, GRID, GRID, DIM)).astype(np.float16)  # noqa: E731
            batch = {L.KEY: np.array([f"k{i}-{j}" for j in range(n)], dtype=object), L.LABEL: np.arange(n) % 1000,
                     L.ERROR: np.array([""] * n, dtype=object), L.MEAN: grid(), L.MEAN_FLIP: grid(),
                     L.LOGVAR: grid(), L.LOGVAR_FLIP: grid(),
                     L.TOKENS: rng.standard_normal((n, GRID * GRID, DIM)).astype(np.float16)}
            committer.add({k: v[0] for k, v in L.write_shard(batch, latents_url=out, run_id="b").items()})
        manifest = committer.commit()
        shards = manifest["shards"]
        size = sum(s["bytes"] for s in shards)
        footer = sum(s["footer_bytes"] for s in shards)
        print(f"{len(shards)} shards of {args.rows} rows: {size / len(shards) / 1e6:.1f} MB each, footer "
              f"{footer / len(shards) / 1e3:.1f} KB each", flush=True)

        t0 = time.perf_counter()
        L.check_shards(out, manifest)
        checked = time.perf_counter() - t0
        t0 = time.perf_counter()
        for s in shards:
            with open(os.path.join(out, s["file"]), "rb") as f:
                hashlib.sha256(f.read()).hexdigest()
        hashed = time.perf_counter() - t0
        per = len(shards)
        print(f"check_shards: {checked / per * 1e3:.2f} ms per shard, {footer / per / 1e3:.1f} KB read per shard",
              flush=True)
        print(f"sha256:       {hashed / per * 1e3:.2f} ms per shard, {size / per / 1e6:.1f} MB read per shard "
              f"({hashed / checked:.0f}x the time, {size / footer:.0f}x the bytes)", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()

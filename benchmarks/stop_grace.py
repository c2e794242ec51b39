"""How long a training stage needs between SIGTERM and its exit: the grace period to give its pod.

    uv run python benchmarks/stop_grace.py                        # all three parts below
    uv run python benchmarks/stop_grace.py --save-preset none     # skip the 2+ GB checkpoint write

A stop (pipelines/core/stop.py) finishes the step under way, saves a checkpoint when the newest is
older than `checkpoint_on_stop_after_s`, releases the writer lease and stops Ray. Printed:

  1. state    the bytes of a checkpoint of each preset on the reference token space (16x16 tokens
              of 16 dims, 1000 classes): model, EMA and AdamW's two moments, fp32, 16 B per weight
  2. save     `checkpoints.save` of `--save-preset`'s full state (random weights, AdamW moments
              filled by one step) into a local folder: write to a temporary folder, then the copy
              that publishes it, as a training run's rank 0 does; seconds and GB/s
  3. stop     a real `sar pretrain` (tiny model, local mode, num_workers 0) sent SIGTERM once it
              has logged `--after` rows: seconds from the signal to its exit (143), with the step,
              the checkpoint and Ray's shutdown, and what it printed last

The grace period a run needs is then about: its step time + state bytes / the write bandwidth of
its checkpoint store + the stop overhead of part 3. docs/cluster.md ("Stopping") applies it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import yaml  # noqa: E402

from models import PRESETS, build_model, count_parameters  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = dict(token_dim=16, height=16, width=16, num_classes=1000, grouping="next-neighbour")
BYTES_PER_WEIGHT = 4 * 4  # fp32 model, EMA, AdamW exp_avg and exp_avg_sq


def state_sizes() -> None:
    for preset in ("sar-b", "sar-l", "sar-h"):
        with torch.device("meta"):
            n = count_parameters(build_model(preset, **REFERENCE))
        print(f"state {preset}: {n / 1e6:.0f}M weights, checkpoint {n * BYTES_PER_WEIGHT / 1e9:.1f} GB", flush=True)


def save_time(preset: str) -> None:
    from jobs.config import load_config
    from pipelines.train import checkpoints
    from pipelines.train.optim import make_optimizer

    model = build_model(preset, **REFERENCE)
    opt = make_optimizer(model, load_config(None).pretrain)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # AdamW's moments exist, as after any step
    state = {"model": model.state_dict(), "ema": {k: v.clone() for k, v in model.state_dict().items()},
             "optimizer": opt.state_dict(), "step": 1}
    out = tempfile.mkdtemp(prefix="stop-grace-", dir=os.environ.get("BENCH_DIR"))
    try:
        t0 = time.perf_counter()
        url = checkpoints.save(out, 1, state, {"step": 1}, keep=1)
        seconds = time.perf_counter() - t0
        size = os.path.getsize(os.path.join(url, checkpoints.STATE_FILE))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"save {preset}: {size / 1e9:.2f} GB in {seconds:.1f} s ({size / 1e9 / seconds:.2f} GB/s, written twice: "
          f"temporary folder, then published)", flush=True)


def stop_time(after: int) -> None:
    from pipelines.data.synth import make_synthetic_imagenet

    root = tempfile.mkdtemp(prefix="stop-grace-run-")
    try:
        make_synthetic_imagenet(f"{root}/imagenet", classes=2, per_class=4, size=16, seed=1, val_per_class=0)
        config = {"run_dir": f"{root}/run", "data": {"source": f"{root}/imagenet"},
                  "encode": {"encoder": "raw", "image_size": 16, "patch": 4, "storage_dtype": "float32"},
                  "model": {"preset": "tiny", "grouping": "next-row"},
                  "pretrain": {"steps": 100_000, "global_batch": 4, "micro_batch": 4, "checkpoint_every": 100_000,
                               "log_every": 1, "num_workers": 0, "precision": "fp32", "checkpoint_on_stop_after_s": 0,
                               "optim": {"warmup_steps": 0}},
                  "cluster": {"num_cpus": 2}, "tracking": {"backend": "none"}}
        with open(f"{root}/tiny.yaml", "w") as f:
            yaml.safe_dump(config, f)
        sar = os.path.join(os.path.dirname(sys.executable), "sar")
        subprocess.run([sar, "encode", "-c", f"{root}/tiny.yaml"], check=True, capture_output=True, cwd=REPO)
        with open(f"{root}/out", "w") as out, open(f"{root}/err", "w") as err:
            proc = subprocess.Popen([sar, "pretrain", "-c", f"{root}/tiny.yaml"], stdout=out, stderr=err, cwd=REPO)
            while open(f"{root}/out").read().count("step=") < after:
                if proc.poll() is not None:
                    tail = open(f"{root}/err").read()[-2000:]
                    raise SystemExit(f"sar pretrain ended early ({proc.returncode}): {tail}")
                time.sleep(0.05)
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=600)
            seconds = time.perf_counter() - t0
        last = open(f"{root}/err").read().strip().splitlines()[-1]
        print(f"stop: exit {code} {seconds:.1f} s after SIGTERM; last line: {last}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save-preset", default="sar-b", choices=[*PRESETS, "none"])
    parser.add_argument("--after", type=int, default=5, help="logged steps before the SIGTERM")
    parser.add_argument("--skip-stop", action="store_true", help="leave out part 3 (it starts Ray)")
    args = parser.parse_args()
    state_sizes()
    if args.save_preset != "none":
        save_time(args.save_preset)
    if not args.skip_stop:
        stop_time(args.after)


if __name__ == "__main__":
    main()

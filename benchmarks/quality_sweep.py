"""Train and score many settings on one token dataset, in one process, to choose defaults.

    uv run python benchmarks/quality_sweep.py --run-dir RUN [--config configs/demo.yaml]
        --variant 'NAME: KEY=VALUE KEY=VALUE' [--variant ...] [--sample 'NAME: KEY=VALUE ...' ...]
        [--refine 'NAME: KEY=VALUE ...' ...] [--per-class 8] [--device cpu|cuda]
    uv run python benchmarks/quality_sweep.py --run-dir RUN --weights pretrain refine \
        --sample 'NAME: KEY=VALUE ...' [--sample ...]          # sampling settings only, no training

RUN is a run directory whose latents (`sar encode`) and domain evaluator (`{run_dir}/evaluator.pt`,
made by `sar fid` with fid.evaluator=domain) exist, e.g. one left by `sar demo` or
benchmarks/quality.py; its data.source must be readable (the evaluator's held-out images).

For each variant (config overrides on top of --config): pretrain with the training loop's own
functions (pipelines/train/worker.py `prepare` and `train_step`; no Ray: the latents are read into
memory), optionally refine the EMA weights under each `--refine` setting, then sample `--per-class` images of every
class with the EMA weights under each sampling setting (`--sample`; default: the config's) and
score them against the evaluator's held-out real images: domain FID, precision, recall, class
accuracy (pipelines/evaluate/domain.py). One line per (variant, stage, sampling setting), and the
training seconds, so a setting's cost can be weighed on the machine that will run it.

--weights STAGE [STAGE ...] trains nothing: it samples the newest checkpoint's EMA weights of each
named stage of RUN (`sar pretrain`/`sar refine` outputs) under each sampling setting, for curves
such as quality against head steps on one trained model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from jobs.config import PipelineConfig, load_config  # noqa: E402
from pipelines.train import driver, worker  # noqa: E402
from pipelines.train.loop_config import LoopConfig  # noqa: E402
from pipelines.data import latents
from pipelines.evaluate import domain, sampling
from pipelines.train import checkpoints
from pipelines.data.codecs import codec_from_manifest  # noqa: E402


def parse(spec: str) -> tuple[str, list[str]]:
    """'NAME: k=v k=v' -> (NAME, ['k=v', 'k=v'])."""
    name, _, rest = spec.partition(":")
    return name.strip(), rest.split()


def batches(data: dict[str, np.ndarray], size: int, gen: torch.Generator):
    """Shuffled batches of the in-memory rows, epoch after epoch (drop_last, as the loop)."""
    n = len(data[latents.LABEL])
    tensors = {k: torch.from_numpy(v) for k, v in data.items()}
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - size + 1, size):
            idx = order[i:i + size]
            yield {k: v[idx] for k, v in tensors.items()}


def train(cfg: PipelineConfig, stage: str, manifest: dict, data: dict, device: torch.device,
          start: dict | None = None) -> tuple[torch.nn.Module, float]:
    """(EMA model, seconds) after `{stage}.steps` steps of the training loop on the in-memory rows."""
    section = driver.resolve_length(getattr(cfg, stage), len(data[latents.LABEL]))
    with tempfile.TemporaryDirectory(prefix="sar-sweep-") as stage_dir:
        model_config = driver.build_model_config(cfg.model, manifest)
        loop = LoopConfig(stage=stage, stage_dir=stage_dir, train=section, model_config=model_config,
                          token_space=checkpoints.token_space(manifest), inputs={}, run_config={},
                          use_gpu=device.type == "cuda", accum=section.global_batch // section.micro_batch,
                          hflip=cfg.data.hflip)
        torch.manual_seed(section.seed)
        t, _ = worker.prepare(loop, device)
        if start is not None:  # refine from the pretrained EMA weights, as refine.init_weights=ema
            t.model.load_state_dict(start)
            t.ema.module.load_state_dict(start)
            t.ema.n_averaged.fill_(1)
        gen = torch.Generator().manual_seed(section.seed)
        accum = section.global_batch // section.micro_batch
        it = batches(data, section.micro_batch, gen)
        t0 = time.perf_counter()
        for _ in range(section.steps):
            worker.train_step(t, [next(it) for _ in range(accum)], gen, {})
        if device.type == "cuda":
            torch.cuda.synchronize()
        return t.ema.module.eval(), time.perf_counter() - t0


def trained(cfg: PipelineConfig, stage: str, device: torch.device) -> torch.nn.Module:
    """The EMA weights of the newest checkpoint of `stage` in the config's run directory."""
    stage_dir = os.path.join(cfg.run_dir, stage)
    ckpt = checkpoints.find_latest(stage_dir)
    if ckpt is None:
        raise SystemExit(f"--weights {stage}: no checkpoint in {stage_dir}")
    model, _ = checkpoints.load_model(ckpt, "ema")
    return model.to(device).eval()


def generate(model, codec, cfg: PipelineConfig, per_class: int, device: torch.device) -> domain.LabelledImages:
    """`per_class` images of every class, made with the config's sample settings."""
    plan = sampling.SamplePlan(model.config.num_classes, per_class, cfg.sample.seed)
    rows = plan.rows(range(plan.size))
    images = sampling.SampleSettings.from_config(cfg.sample).render(model, codec, rows, device)
    return domain.LabelledImages(images, rows[sampling.LABEL])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--variant", action="append", default=[], help="'NAME: KEY=VALUE ...' (training settings)")
    p.add_argument("--sample", action="append", default=[], help="'NAME: KEY=VALUE ...' (sampling settings)")
    p.add_argument("--refine", action="append", default=[], metavar="'NAME: KEY=VALUE ...'",
                   help="refine each pretrained model with these settings too (repeatable; 'config:' for the config's)")
    p.add_argument("--weights", nargs="+", default=[], metavar="STAGE",
                   help="no training: sample the newest EMA weights of these stages of --run-dir")
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    variants = [parse(v) for v in args.variant] or [("config", [])]
    samplings = [parse(s) for s in args.sample] or [("config", [])]

    base = [f"run_dir={args.run_dir}"]
    cfg0 = load_config(args.config, base).with_absolute_paths()
    manifest = latents.read_manifest(cfg0.latents_dir)
    data = latents.load_arrays(cfg0.latents_dir)
    reference = domain.reference_images(cfg0.evaluator_path, cfg0.data.source)
    scorer = domain.DomainScorer(cfg0.evaluator_path, reference, cuda=device.type == "cuda")
    codec = codec_from_manifest(checkpoints.token_space(manifest)).to(device)
    print(f"quality sweep on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else os.cpu_count()} "
          f"{'' if device.type == 'cuda' else 'CPUs'}): {len(data[latents.LABEL])} rows, grid {manifest['grid']} x "
          f"{manifest['token_dim']}; reference {len(reference)} held-out images; {args.per_class} samples per class",
          flush=True)
    print("| variant | stage | sampling | train s | domain FID | precision | recall | accuracy |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    for name, overrides in variants:
        cfg = load_config(args.config, [*base, *overrides]).with_absolute_paths()
        if args.weights:  # the run's own trained weights
            models = [(stage, trained(cfg, stage, device), 0.0, []) for stage in args.weights]
            name = "run"
        else:
            pre, secs = train(cfg, "pretrain", manifest, data, device)
            models = [("pretrain", pre, secs, [])]
            for rname, roverrides in map(parse, args.refine):
                rcfg = load_config(args.config, [*base, *overrides, *roverrides]).with_absolute_paths()
                ref, rsecs = train(rcfg, "refine", manifest, data, device, start=pre.state_dict())
                models.append((f"refine {rname}", ref, rsecs, roverrides))
        for stage, model, seconds, roverrides in models:
            for sname, soverrides in samplings:
                scfg = load_config(args.config, [*base, *overrides, *roverrides, *soverrides])
                images = generate(model, codec, scfg, args.per_class, device)
                s = scorer.score(images, images.labels, kid=False)
                print(f"| {name} | {stage} | {sname} | {seconds:.0f} | {s['fid']:.3f} | {s['precision']:.3f} | "
                      f"{s['recall']:.3f} | {s['accuracy']:.3f} |", flush=True)


if __name__ == "__main__":
    main()

"""What the pipeline generates, measured offline: domain FID, precision/recall and class accuracy.

    uv run python benchmarks/quality.py [--config configs/demo.yaml] [--set KEY=VALUE ...]
        [--source DIR] [--work DIR] [--tables guidance,refine,grouping] [--grouping-steps N] [--per-class 8]

Without Inception weights FID says nothing offline, so the yardstick is the domain evaluator
(pipelines/evaluate/domain.py): a small classifier trained on the dataset's own real images, whose
penultimate features stand in for Inception's in torch-fidelity's FID and precision/recall, and
whose logits give the class accuracy of class-conditional samples.

1. Data: the synthetic ImageNet-layout set `sar demo` makes (10 classes x 32 train images at
   48 px, pipelines/data/synth.py) plus `--per-class` validation images per class that nothing trains
   on; or `--source DIR` (any ImageNet-layout folder; its val/ split, if any, is the real set).
2. Evaluator: trained on the train split; 20% of each class is held out: the reference R.
3. Pipeline: `sar run` with the config (encode, pretrain, refine, sample, fid) in this process.
4. Scores, every set the same size (`--per-class` x classes) against R: real validation images
   (the floor), noise (the ceiling), and the samples of the pretrain and the refine checkpoint,
   made with the config's sampling settings. Each is drawn with 2 seed sets; the mean is
   printed (and half the spread). The tables draw one set per row.
5. Tables (`--tables`): guidance kinds on the refined checkpoint (the config's weights);
   refinement vs its pretrained start at equal sampling settings, with the exposure-bias gap
   (student vs teacher clean estimates, pipelines/train/objectives.py) of both on the same batches;
   groupings at equal optimizer steps and batch (each pretrained from scratch, no refinement).

Prints markdown tables for docs/benchmarks.md. On 2 CPU cores the default run takes ~10-25 min.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from jobs.config import PipelineConfig, load_config  # noqa: E402
from models import Guidance  # noqa: E402
from pipelines.evaluate import sampling  # noqa: E402
from pipelines.data import latents
from pipelines.evaluate import domain
from pipelines.train import checkpoints

SEED_SETS = (0, 1)  # sample seeds of the main rows: each score is the mean over these draws
METRICS = ("fid", "precision", "recall", "accuracy")


def synthetic_source(root: str, per_class: int) -> str:
    """The demo's synthetic set (jobs/demo.py's sizes) with `per_class` validation images per class."""
    from jobs.demo import DEMO_CLASSES, DEMO_PER_CLASS, DEMO_SIZE
    from pipelines.data.synth import make_synthetic_imagenet

    make_synthetic_imagenet(root, classes=DEMO_CLASSES, per_class=DEMO_PER_CLASS, size=DEMO_SIZE, seed=0,
                            val_per_class=per_class)
    return root


def real_set(source: str, cfg: PipelineConfig, per_class: int, wnids: list[str]) -> domain.LabelledImages:
    """`per_class` real images per class that neither the evaluator nor the generator trained on."""
    from pipelines.data.imagenet import list_imagenet

    listing = list_imagenet(source, "val", None, None)
    if not listing.items:
        raise SystemExit(f"{source}: no val/ split to take real images from")
    by_label: dict[int, list[str]] = {}
    for key, label in listing.items:
        by_label.setdefault(wnids.index(listing.wnids[label]), []).append(key)
    keys = [k for label in sorted(by_label) for k in by_label[label][:per_class]]
    labels = [label for label in sorted(by_label) for _ in by_label[label][:per_class]]
    images, labels, keys, rejected = domain.decode_keys(source, keys, labels, cfg.encode.image_size)
    return domain.LabelledImages(images, labels, keys)


def sample_set(ckpt: str, cfg: PipelineConfig, per_class: int, seed: int,
               guidance: Guidance | None = None) -> domain.LabelledImages:
    """`per_class` images of every class from a checkpoint's EMA weights, made as `sar sample` makes them
    (the config's sample settings; `guidance` replaces the config's)."""
    model, codec, meta = sampling.load_generator(ckpt, "ema", None, torch.device("cpu"))
    plan = sampling.SamplePlan(sampling.num_classes(meta, None), per_class, seed)
    rows = plan.rows(range(plan.size))
    settings = sampling.SampleSettings.from_config(cfg.sample)
    if guidance is not None:
        settings = dataclasses.replace(settings, guidance=dataclasses.asdict(guidance))
    return domain.LabelledImages(settings.render(model, codec, rows, torch.device("cpu")), rows[sampling.LABEL])


def score(scorer: domain.DomainScorer, sets: list[domain.LabelledImages]) -> dict[str, tuple[float, float]]:
    """Mean and spread (max - min) of each metric over the given sets."""
    rows = [scorer.score(s, s.labels if s.labels.min() >= 0 else None, kid=False) for s in sets]
    out = {}
    for m in METRICS:
        values = [r[m] for r in rows if r[m] is not None]
        out[m] = (statistics.fmean(values), max(values) - min(values)) if values else (float("nan"), 0.0)
    return out


def fmt(scores: dict[str, tuple[float, float]]) -> str:
    return " | ".join(f"{scores[m][0]:.3f}" + (f" ±{scores[m][1] / 2:.3f}" if scores[m][1] else "") for m in METRICS)


def run_stages(cfg: PipelineConfig, only: str | None = None) -> float:
    """`sar run` (or one stage) in this process; returns the seconds it took."""
    from jobs.run import run_pipeline

    t0 = time.perf_counter()
    rc = run_pipeline(cfg, only=only)
    if rc:
        raise SystemExit(f"sar run failed with exit code {rc}")
    return time.perf_counter() - t0


@torch.no_grad()
def exposure_gap(ckpt: str, cfg: PipelineConfig, batches: list[dict]) -> dict[str, float]:
    """The refine objective's exposure-bias gap (per group bucket) of a checkpoint's EMA weights."""
    from pipelines.train.objectives import RefineObjective

    model, _ = checkpoints.load_model(ckpt, "ema")
    objective = RefineObjective(model, cfg.refine).eval()
    gen = torch.Generator().manual_seed(0)
    sums: dict[str, float] = {}
    for batch in batches:
        x, labels = latents.tokens_from_batch(batch, model.grouping, gen, torch.device("cpu"))
        _, _, metrics = objective(x, labels, gen)
        for k, v in metrics.items():
            if k.startswith("gap_"):
                sums[k] = sums.get(k, 0.0) + float(v) / len(batches)
    return sums


def latent_batches(cfg: PipelineConfig, n: int = 4, size: int = 32) -> list[dict]:
    dataset, _ = latents.open_latents(cfg.latents_dir)
    rows = dataset.select_columns(list(latents.TRAIN_COLUMNS)[:3]).take_batch(n * size, batch_format="numpy")
    return [{k: torch.from_numpy(np.ascontiguousarray(v[i * size:(i + 1) * size])) for k, v in rows.items()}
            for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--source", help="an ImageNet-layout folder (default: the demo's synthetic set)")
    p.add_argument("--work", help="keep everything here (default: a temporary folder)")
    p.add_argument("--per-class", type=int, default=8, help="images per class of every scored set")
    p.add_argument("--tables", default="guidance,refine,grouping")
    p.add_argument("--grouping-steps", type=int, help="pretrain steps of each grouping row (default: the config's)")
    args = p.parse_args()
    tables = set(filter(None, args.tables.split(",")))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))

    work = args.work or tempfile.mkdtemp(prefix="sar-quality-")
    source = args.source or synthetic_source(os.path.join(work, "imagenet"), args.per_class)
    base = [f"run_dir={work}/run", f"data.source={source}", "fid.evaluator=domain"]
    cfg = load_config(args.config, [*base, *args.overrides]).with_absolute_paths()
    print(f"quality benchmark: {args.config} {' '.join(args.overrides)}; work {work}; "
          f"{torch.get_num_threads()} torch threads, load {os.getloadavg()[0]:.1f}", flush=True)

    # The pipeline: encode, pretrain, refine, sample, fid (the evaluator is trained in its first use).
    seconds = run_stages(cfg)
    meta = domain.read_metadata(cfg.evaluator_path)
    reference = domain.reference_images(cfg.evaluator_path, source)
    scorer = domain.DomainScorer(cfg.evaluator_path, reference, batch_size=64, cuda=False)
    n = args.per_class * len(meta["wnids"])
    pre = checkpoints.find_latest(cfg.pretrain_dir)
    ref = checkpoints.find_latest(cfg.refine_dir)
    print(f"\npipeline: {seconds:.0f} s; evaluator held-out accuracy {meta['heldout_accuracy']:.3f}; reference R: "
          f"{len(reference)} held-out real images; every scored set: {n} images", flush=True)

    def samples(ckpt, seeds=SEED_SETS, **kw):
        return [sample_set(ckpt, cfg, args.per_class, seed, **kw) for seed in seeds]

    real = real_set(source, cfg, args.per_class, meta["wnids"])
    rows = {"real validation images (floor)": score(scorer, [real]),
            "noise (ceiling)": score(scorer, [domain.noise_images(n, cfg.encode.image_size)]),
            f"pretrain step {checkpoints.read_meta(pre)['step']}": score(scorer, samples(pre)),
            f"refine step {checkpoints.read_meta(ref)['step']}": score(scorer, samples(ref))}
    guidance = cfg.sample.guidance
    print(f"\n| set ({guidance.kind} w_x {guidance.w_x} w_z {guidance.w_z}, {cfg.sample.flow_steps} flow steps) "
          f"| domain FID | precision | recall | class accuracy |\n|---|---|---|---|---|")
    for name, s in rows.items():
        print(f"| {name} | {fmt(s)} |")
    floor = rows["real validation images (floor)"]["fid"][0]
    for name in list(rows)[2:]:
        print(f"{name}: domain FID {rows[name]['fid'][0] / floor:.1f}x the real floor, "
              f"accuracy {rows[name]['accuracy'][0]:.1%}")

    if "guidance" in tables:
        print(f"\n| guidance on the refined checkpoint | domain FID | precision | recall | class accuracy |\n"
              f"|---|---|---|---|---|")
        for kind in ("none", "cfg", "x_cfg", "z_cfg", "xz_cfg"):
            g = Guidance(kind, cfg=guidance.cfg, w_x=guidance.w_x, w_z=guidance.w_z)
            print(f"| {kind} (cfg {g.cfg}, w_x {g.w_x}, w_z {g.w_z}) | "
                  f"{fmt(score(scorer, samples(ref, seeds=(0,), guidance=g)))} |",
                  flush=True)

    if "refine" in tables:
        batches = latent_batches(cfg)
        print("\n| checkpoint | exposure gap early | middle | late |\n|---|---|---|---|")
        for name, ckpt in (("pretrain", pre), ("refine", ref)):
            gap = exposure_gap(ckpt, cfg, batches)
            print(f"| {name} | {gap['gap_early']:.4f} | {gap['gap_middle']:.4f} | {gap['gap_late']:.4f} |")

    if "grouping" in tables:
        steps = args.grouping_steps or cfg.pretrain.steps
        print(f"\n| grouping ({steps} steps x batch {cfg.pretrain.global_batch}, no refine) | T | "
              f"train s | domain FID | precision | recall | class accuracy |\n|---|---|---|---|---|---|---|")
        for grouping in ("next-token", "next-row", "next-neighbour", "next-scale"):
            side = cfg.encode.image_size // cfg.encode.patch
            scales = [s for s in (1, 2, 4, 8, 16, 32) if s < side] + [side] if grouping == "next-scale" else None
            g_cfg = load_config(args.config, [*base, *args.overrides, f"run_dir={work}/grouping-{grouping}",
                                              f"model.grouping={grouping}",
                                              *([f"model.scales={scales}".replace(" ", "")] if scales else []),
                                              f"fid.domain.path={cfg.evaluator_path}", f"pretrain.steps={steps}"]
                                             ).with_absolute_paths()
            run_stages(g_cfg, only="encode")
            secs = run_stages(g_cfg, only="pretrain")
            ckpt = checkpoints.find_latest(g_cfg.pretrain_dir)
            groups = checkpoints.load_model(ckpt, "ema")[0].grouping.num_groups
            print(f"| {grouping} | {groups} | {secs:.0f} | {fmt(score(scorer, samples(ckpt, seeds=(0,))))} |", flush=True)


if __name__ == "__main__":
    main()

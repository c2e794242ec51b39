"""What the pipeline generates on real images, measured under a protocol that cannot flatter.

    uv run sar mnist data/mnist                                     # the real set: 400 / 50 / 50 per class
    uv run python -u benchmarks/quality.py --source data/mnist --config configs/mnist.yaml --work W \\
        [--split test|val] [--tables floor,runs,guidance,grouping,refine,sweep] [--runs RUN_DIR ...] [--weights FILE] \\
        [--train-seeds 0 1] [--sample-seeds 0 1 2] [--per-class 50] [--steps-scale F] [--quick]
        [--variant 'NAME: KEY=VALUE ...'] [--sample 'NAME: KEY=VALUE ...'] [--refine 'NAME: KEY=VALUE ...']

The protocol (docs/benchmarks.md, Quality; fid.domain.reference_split / floor_split in `sar fid`):
- The yardstick is the domain evaluator (pipelines/evaluate/domain.py): a small classifier trained on
  the source's train/ images only, whose features give FID / precision / recall through
  torch-fidelity's code and whose logits give the class accuracy of class-conditional samples.
- Every setting is chosen with `--split val` (samples scored against the val/ images) and every
  reported figure is made with `--split test` (against the test/ images). The real floor is the other
  split's real images against the same reference at the samples' set size (test vs val when choosing,
  val vs test when reporting): FIDs are compared only between sets of equal size.
- Each figure is the mean ± std over the `--sample-seeds` sets (3 by default), and over the
  `--train-seeds` too where a row trains (the headline rows).

Tables (`--tables`):
  floor     the real floor and noise, the evaluator's own accuracy on the split
  runs      the newest pretrain and refine checkpoints of each `--runs` directory (`sar run` outputs,
            e.g. configs/mnist.yaml with pretrain.seed / refine.seed 0 and 1): the headline rows
  guidance  guidance kinds and weights (and any --sample setting) on the --weights model, else the first
            run's refine, else a model trained here (train seed 0)
  grouping  the groupings at equal compute: each pretrained from scratch with the same number of
            backbone token-forwards (steps scaled by next-neighbour's sequence length over its own)
  refine    refinement against a fair control, per grouping (next-neighbour and next-scale) and train
            seed: pretraining to the share `1 - refine share`, then from that checkpoint refinement
            (each `--refine` setting) and the control (the same run with gamma 0: the same steps, lr
            schedule, EMA and batches without L_CSF), beside pretraining continued to the end
  loss      under- or overfitting: the training loss of the --weights model and of each --variant (kept
            or trained) on train/ rows and on the split's images, the same draws for both
  sweep     each `--variant` (training overrides) pretrained (and refined with each `--refine`), sampled
            with each `--sample` setting: how settings are chosen on val
Models here are trained in this process with the loop's own functions (pipelines/train/worker.py:
`prepare`, `train_step`) on the latents in memory, no Ray; their EMA weights are kept under
`--work`/models, named by their training settings, so a later run that samples them otherwise (another
`--sample`, another table) loads them instead of training again; `--steps-scale` shortens their training
(the orderings at less compute) and `--quick` is a development run (one train seed, two sample seeds,
20 images a class, a fifth of the steps). Prints markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import os
import statistics
import sys
import time

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from jobs.config import PipelineConfig, load_config  # noqa: E402
from models import SARConfig, SARModel  # noqa: E402
from pipelines.core.storage import open_atomic  # noqa: E402
from pipelines.data import latents  # noqa: E402
from pipelines.data.codecs import codec_from_manifest  # noqa: E402
from pipelines.data.encode import encode_with_flips  # noqa: E402
from pipelines.evaluate import domain, domain_training, sampling  # noqa: E402
from pipelines.train import checkpoints, driver, worker  # noqa: E402
from pipelines.train.loop_config import LoopConfig  # noqa: E402
from pipelines.train.objectives import make_objective  # noqa: E402

METRICS = ("fid", "precision", "recall", "accuracy")
OTHER_SPLIT = {"val": "test", "test": "val"}


def parse(spec: str) -> tuple[str, list[str]]:
    """'NAME: k=v k=v' -> (NAME, ['k=v', 'k=v'])."""
    name, _, rest = spec.partition(":")
    return name.strip(), rest.split()


# The protocol ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    """Per metric: every set's value (one per seed), and the sets' sizes."""

    values: dict[str, list[float]]
    sizes: str

    def cell(self, metric: str) -> str:
        v = [x for x in self.values[metric] if x is not None]
        if not v:
            return "—"
        mean = statistics.fmean(v)
        text = f"{100 * mean:.1f}%" if metric == "accuracy" else f"{mean:.3f}"
        if len(v) > 1:
            sd = statistics.stdev(v)
            text += f" ± {100 * sd:.1f}" if metric == "accuracy" else f" ± {sd:.3f}"
        return text

    def mean(self, metric: str) -> float:
        return statistics.fmean(self.values[metric])

    def markdown(self, name: str, extra: str = "") -> str:
        return f"| {name} | {' | '.join(self.cell(m) for m in METRICS)} | {self.sizes} |{extra}"


HEADER = "| {what} | domain FID | precision | recall | class accuracy | sets (n vs n) |{extra}\n|---|---|---|---|---|---|{sep}"


class Protocol:
    """Scores image sets against the `split` images of the source with the domain evaluator."""

    def __init__(self, cfg: PipelineConfig, split: str, per_class: int):
        so = cfg.data.storage_options
        meta = domain_training.ensure_evaluator(cfg.evaluator_path, cfg.data.source, split=cfg.data.split,
                                                image_size=cfg.fid.domain.image_size or cfg.encode.image_size,
                                                classes=cfg.data.classes, per_class=cfg.data.per_class,
                                                settings=cfg.fid.domain, storage_options=so)
        self.split, self.other = split, OTHER_SPLIT[split]
        real = domain.real_sets(cfg.evaluator_path, cfg.data.source, split, self.other, storage_options=so)
        if real.reference_from != f"{split}/" or real.floor_from != f"{self.other}/":
            raise SystemExit(f"{cfg.data.source}: needs val/ and test/ splits (`sar mnist` makes them)")
        self.reference, self.floor_images = real.reference, real.floor
        self.n = per_class * len(meta["wnids"])
        self.image_size = meta["image_size"]
        self.scorer = domain.DomainScorer(cfg.evaluator_path, self.reference, batch_size=100, cuda=False)
        self.evaluator_accuracy = meta["heldout_accuracy"]

    def score(self, sets: list[domain.LabelledImages]) -> Row:
        values: dict[str, list[float]] = {m: [] for m in METRICS}
        for images in sets:
            labels = images.labels if images.labels.min() >= 0 else None
            s = self.scorer.score(images, labels, kid=False)
            for m in METRICS:
                values[m].append(s[m])
        return Row(values, f"{len(sets[0])} vs {len(self.reference)}")

    def floor(self) -> Row:
        """Real images of the other split against the reference, as many as the samples."""
        return self.score([domain.balanced_subset(self.floor_images, self.n)])

    def noise(self, seeds: list[int]) -> Row:
        return self.score([domain.noise_images(self.n, self.image_size, seed=s) for s in seeds])


# Models -----------------------------------------------------------------------------------------
def batches(data: dict[str, np.ndarray], size: int, gen: torch.Generator):
    """Shuffled batches of the in-memory rows, epoch after epoch (drop_last, as the loop)."""
    n = len(data[latents.LABEL])
    tensors = {k: torch.from_numpy(v) for k, v in data.items()}
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - size + 1, size):
            idx = order[i:i + size]
            yield {k: v[idx] for k, v in tensors.items()}


@dataclasses.dataclass
class Trained:
    """A model trained here: its EMA weights (a copy), and the loop's live state to train on when kept."""

    ema: torch.nn.Module
    seconds: float
    done: int                                   # optimizer steps taken
    trainer: worker.Trainer | None = None
    batches: object = None
    gen: torch.Generator | None = None
    accum: int = 1


def train(cfg: PipelineConfig, stage: str, manifest: dict, data: dict, *, steps: int | None = None,
          start: dict | None = None, keep: bool = False, until: int | None = None) -> Trained:
    """`{stage}.steps` (or `steps`) steps of the training loop on the in-memory rows, from scratch or from
    `start` weights; `until` stops early at that step (the rest can follow with `resume`)."""
    section = driver.resolve_length(getattr(cfg, stage), len(data[latents.LABEL]))
    if steps is not None:
        section = section.model_copy(update={"steps": steps})
    model_config = driver.build_model_config(cfg.model, manifest)
    accum = section.global_batch // section.micro_batch
    loop = LoopConfig(stage=stage, stage_dir=cfg.run_dir, train=section, model_config=model_config,
                      token_space=checkpoints.token_space(manifest), inputs={}, run_config={}, use_gpu=False,
                      accum=accum, hflip=cfg.data.hflip)
    torch.manual_seed(section.seed)
    t, _ = worker.prepare(loop, torch.device("cpu"))
    if start is not None:  # from a checkpoint's EMA weights, as refine.init_weights=ema
        t.model.load_state_dict(start)
        t.ema.module.load_state_dict(start)
        t.ema.n_averaged.fill_(1)
    gen = torch.Generator().manual_seed(worker.augmentation_seed(section.seed, 0, 0))
    it = batches(data, section.micro_batch, torch.Generator().manual_seed(section.seed))
    return resume(Trained(t.ema.module, 0.0, 0, t, it, gen, accum), until or section.steps, keep=keep)


def resume(trained: Trained, steps: int, keep: bool = False) -> Trained:
    """Train a kept model on to `steps` optimizer steps in all; the returned EMA weights are a copy."""
    t, t0 = trained.trainer, time.perf_counter()
    for _ in range(trained.done, steps):
        worker.train_step(t, [next(trained.batches) for _ in range(trained.accum)], trained.gen, {})
    out = Trained(copy.deepcopy(t.ema.module).eval(), trained.seconds + time.perf_counter() - t0, steps)
    if keep:
        out.trainer, out.batches, out.gen, out.accum = t, trained.batches, trained.gen, trained.accum
    return out


def load_kept(path: str) -> Trained:
    """EMA weights `Bench.kept` saved (their model config, training seconds and steps beside them)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = SARModel(SARConfig.from_dict(saved["model_config"])).eval()
    model.load_state_dict(saved["ema"])
    return Trained(model, saved["seconds"], saved["steps"])


def rows_of(codec, images: domain.LabelledImages) -> dict[str, np.ndarray]:
    """Latent rows of real images, encoded in this process as `sar encode` writes them (and their flips)."""
    mean, logvar = encode_with_flips(codec, torch.from_numpy(np.ascontiguousarray(images.images)))
    rows = {latents.LABEL: images.labels, latents.MEAN: mean[0].numpy(), latents.MEAN_FLIP: mean[1].numpy()}
    if logvar is not None:
        rows[latents.LOGVAR], rows[latents.LOGVAR_FLIP] = logvar[0].numpy(), logvar[1].numpy()
    return rows


def flow_loss(model: SARModel, rows: dict[str, np.ndarray], draws: int = 8, hflip_rows: bool = False) -> list[float]:
    """The pretraining loss of `model` on `rows`, once per draw of noise, t and dropped labels (draw k is
    the same for any rows of the same count): the training objective, with no step taken."""
    objective = make_objective("pretrain", copy.deepcopy(model), None).train()
    batch = {k: torch.from_numpy(v) for k, v in rows.items()}
    losses = []
    with torch.no_grad():
        for k in range(draws):
            gen = torch.Generator().manual_seed(k)
            torch.manual_seed(k)
            x, labels = latents.tokens_from_batch(batch, objective.model.grouping, gen, torch.device("cpu"),
                                                  hflip=hflip_rows)
            losses.append(float(objective(x, labels, gen, log_metrics=False)[0]))
    return losses


def images_of(model, codec, cfg: PipelineConfig, per_class: int, seed: int) -> domain.LabelledImages:
    """`per_class` images of every class made with the config's sample settings from noise seed `seed`."""
    plan = sampling.SamplePlan(model.config.num_classes, per_class, seed)
    rows = plan.rows(range(plan.size))
    settings = sampling.SampleSettings.from_config(cfg.sample)
    return domain.LabelledImages(settings.render(model, codec, rows, torch.device("cpu")), rows[sampling.LABEL])


def grid_png(images: domain.LabelledImages, per_class: int, path: str, shown: int = 8) -> None:
    """A classes x `shown` grid of a set (to look at)."""
    classes = len(images) // per_class
    arr = images.images.reshape(classes, per_class, *images.images.shape[1:])[:, :shown]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(sampling.grid_png(arr))


# The benchmark ---------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.args = args
        base = [f"run_dir={args.work}/run", f"data.source={args.source}", "fid.evaluator=domain",
                f"fid.domain.path={args.work}/evaluator.pt", *args.overrides]
        self.base = base
        self.cfg = load_config(args.config, base).with_absolute_paths()
        self.encode(self.cfg)
        self.manifest = latents.read_manifest(self.cfg.latents_dir)
        self.data = latents.load_arrays(self.cfg.latents_dir)
        self.codec = codec_from_manifest(checkpoints.token_space(self.manifest)).eval()
        self.protocol = Protocol(self.cfg, args.split, args.per_class)
        self.cache: dict[tuple, Trained] = {}

    def encode(self, cfg: PipelineConfig) -> None:
        """`cfg`'s latents of the source (`sar encode`, once)."""
        from jobs import encode

        if encode.status(cfg).up_to_date:
            return
        from pipelines.core.ray_runtime import init_ray

        init_ray(cfg.cluster)
        encode.main(cfg)

    def grouped(self, grouping: str, scale_choices: tuple[int, ...]):
        """(scales, overrides, config, manifest, rows) of `grouping`, its latents encoded beside the
        config's; next-scale takes the `scale_choices` below the token grid's side, then the side."""
        side = self.cfg.encode.image_size // (self.cfg.encode.patch or 1)
        scales = [s for s in scale_choices if s < side] + [side] if grouping == "next-scale" else None
        overrides = [f"model.grouping={grouping}", *([f"model.scales=[{','.join(map(str, scales))}]"] if scales else [])]
        cfg = self.config(*overrides, "encode.output=" + self.cfg.latents_dir + f"-{grouping}")
        self.encode(cfg)
        return scales, overrides, cfg, latents.read_manifest(cfg.latents_dir), latents.load_arrays(cfg.latents_dir)

    def config(self, *overrides: str) -> PipelineConfig:
        return load_config(self.args.config, [*self.base, *overrides]).with_absolute_paths()

    def steps(self, cfg: PipelineConfig, stage: str) -> int:
        full = driver.resolve_length(getattr(cfg, stage), len(self.data[latents.LABEL])).steps
        return max(1, round(full * self.args.steps_scale))

    def score(self, model, cfg: PipelineConfig, name: str = "") -> Row:
        sets = [images_of(model, self.codec, cfg, self.args.per_class, s) for s in self.args.sample_seeds]
        if name:
            file = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
            grid_png(sets[0], self.args.per_class, os.path.join(self.args.work, "grids", f"{file}.png"))
        return self.protocol.score(sets)

    def pooled(self, rows: list[Row]) -> Row:
        """Rows of several training seeds as one: every set of every seed."""
        return Row({m: [v for r in rows for v in r.values[m]] for m in METRICS}, rows[0].sizes)

    def pretrained(self, cfg: PipelineConfig, seed: int) -> Trained:
        key = ("pretrain", tuple(self.base), cfg.model_dump_json(), seed)
        if key not in self.cache:
            steps = self.steps(cfg, "pretrain")
            self.cache[key] = self.kept(cfg, self.manifest, ("pretrain", seed, steps),
                                        lambda: train(cfg, "pretrain", self.manifest, self.data, steps=steps))
        return self.cache[key]

    def kept(self, cfg: PipelineConfig, manifest: dict, what: tuple, make) -> Trained:
        """`make()`'s EMA weights, kept under --work/models by the config and `what`: a later run with
        the same training settings (other --sample settings, another table) loads them instead."""
        digest = hashlib.sha256(repr((cfg.model_dump_json(exclude={"sample", "fid", "run_dir"}),
                                      manifest.get("sources", {}).get("digest"), what)).encode()).hexdigest()[:16]
        path = os.path.join(self.args.work, "models", f"{'-'.join(map(str, what))}-{digest}.pt")
        if os.path.exists(path):
            print(f"  kept weights: {path}", flush=True)
            return load_kept(path)
        t = make()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open_atomic(path) as f:
            torch.save({"ema": t.ema.state_dict(), "model_config": driver.build_model_config(cfg.model, manifest),
                        "seconds": t.seconds, "steps": t.done}, f)
        return t

    # Tables ---------------------------------------------------------------------------------------
    def table_floor(self) -> None:
        p = self.protocol
        print(f"\n{HEADER.format(what=f'real and noise, against {p.split}/', extra='', sep='')}")
        print(p.floor().markdown(f"real {p.other}/ images (the floor)"))
        print(p.noise(self.args.sample_seeds).markdown("uniform noise (the ceiling)"))
        print(f"evaluator: trained on train/ only, held-out accuracy {p.evaluator_accuracy:.3f}", flush=True)

    def table_runs(self) -> None:
        rows: dict[str, list[Row]] = {"pretrain": [], "refine": []}
        for run in self.args.runs:
            for stage in rows:
                ckpt = checkpoints.find_latest(os.path.join(run, stage))
                if ckpt is None:
                    continue
                model, meta = checkpoints.load_model(ckpt, "ema")
                cfg = self.config()
                rows[stage].append(self.score(model, cfg, f"run-{os.path.basename(run.rstrip('/'))}-{stage}"))
                print(f"  {run} {stage} step {meta['step']}: {rows[stage][-1].markdown(stage)}", flush=True)
        print(f"\n{HEADER.format(what=f'{len(self.args.runs)} runs x {len(self.args.sample_seeds)} sample seeds, against {self.protocol.split}/', extra='', sep='')}")
        print(self.protocol.floor().markdown(f"real {self.protocol.other}/ (floor)"))
        for stage, r in rows.items():
            if r:
                print(self.pooled(r).markdown(f"{stage} ({len(r)} runs)"))

    def reference_model(self):
        """The model the guidance table samples: the --weights file, else the first run's refine (or
        pretrain), else one trained here."""
        if self.args.weights:
            return load_kept(self.args.weights).ema, self.args.weights
        for run in self.args.runs:
            for stage in ("refine", "pretrain"):
                ckpt = checkpoints.find_latest(os.path.join(run, stage))
                if ckpt:
                    return checkpoints.load_model(ckpt, "ema")[0], f"{run} {stage}"
        return self.pretrained(self.cfg, 0).ema, "pretrained here (train seed 0)"

    def table_guidance(self) -> None:
        model, what = self.reference_model()
        g = self.cfg.sample.guidance
        settings = [("none", ["sample.guidance.kind=none"]),
                    (f"x-CFG {g.w_x}", ["sample.guidance.kind=x_cfg"]),
                    (f"z-CFG {g.w_z}", ["sample.guidance.kind=z_cfg"]),
                    (f"CFG {g.cfg}", ["sample.guidance.kind=cfg"]),
                    (f"x-CFG {g.w_x} + z-CFG {g.w_z}", ["sample.guidance.kind=xz_cfg"]),
                    *[parse(s) for s in self.args.sample]]
        print(f"\n{HEADER.format(what=f'guidance on {what}, against {self.protocol.split}/', extra='', sep='')}")
        for name, overrides in settings:
            print(self.score(model, self.config(*overrides), f"guidance-{name}").markdown(name), flush=True)

    def table_grouping(self) -> None:
        reference = driver.build_model_config(self.cfg.model, self.manifest)

        def model_of(grouping: str, scales) -> SARModel:
            return SARModel(SARConfig.from_dict({**reference, "grouping": grouping, "scales": scales}))

        def seq_len(grouping: str, scales) -> int:
            """Backbone tokens a training pass runs: one stream for shift-aligned groupings, two otherwise."""
            m = model_of(grouping, scales)
            return m.grouping.seq_len * (1 if m.single_stream else 2)

        base_len = seq_len("next-neighbour", None)
        print(f"\n{HEADER.format(what=f'grouping at equal backbone token-forwards, against {self.protocol.split}/', extra=' T | steps | train s |', sep='---|---|---|')}")
        for grouping in ("next-token", "next-row", "next-neighbour", "next-scale"):
            scales, overrides, cfg, manifest, data = self.grouped(grouping, (1, 2, 4, 8, 16, 32))
            steps = round(self.steps(self.cfg, "pretrain") * base_len / seq_len(grouping, scales))
            rows = []
            for seed in self.args.train_seeds:
                scfg = self.config(*overrides, f"pretrain.seed={seed}")
                t = train(scfg, "pretrain", manifest, data, steps=steps)
                rows.append(self.score(t.ema, scfg, f"grouping-{grouping}-{seed}"))
            groups = model_of(grouping, scales).grouping.num_groups
            print(self.pooled(rows).markdown(grouping, f" {groups} | {steps} | {t.seconds:.0f} |"), flush=True)

    def table_refine(self) -> None:
        """Refinement vs its control vs its start, per grouping: the refinement paper's protocol (refinement
        replaces the last share of pretraining) at this dataset's scale."""
        refines = [parse(r) for r in self.args.refine] or [("config", [])]
        for grouping in self.args.refine_groupings:
            _, overrides, cfg, manifest, data = self.grouped(grouping, (1, 2, 3, 4, 6, 8, 12, 16))
            total = self.steps(cfg, "pretrain")
            rows: dict[str, list[Row]] = {}
            for seed in self.args.train_seeds:
                scfg = self.config(*overrides, f"pretrain.seed={seed}", f"refine.seed={seed}")
                share = self.args.refine_share
                start_at = round(total * (1 - share))
                live: dict[str, Trained] = {}  # the pretraining run to continue, when trained here

                def started() -> Trained:
                    live["pre"] = train(scfg, "pretrain", manifest, data, steps=total, until=start_at, keep=True)
                    return live["pre"]

                pre = self.kept(scfg, manifest, ("start", seed, start_at, total), started)
                start_weights = pre.ema.state_dict()
                rows.setdefault(f"start (pretrain step {start_at})", []).append(self.score(pre.ema, scfg))
                plain = self.kept(scfg, manifest, ("continued", seed, start_at, total),
                                  lambda: resume(live["pre"] if "pre" in live else started(), total))
                rows.setdefault(f"pretraining continued to step {total}", []).append(self.score(plain.ema, scfg))
                # Refinement replaces the last `share` of pretraining: as many images as the steps it replaces.
                images = (total - start_at) * scfg.pretrain.global_batch
                for name, roverrides in [("control (gamma 0)", ["refine.gamma=0"])] + [(f"refine {n}", o) for n, o in refines]:
                    rcfg = self.config(*overrides, f"pretrain.seed={seed}", f"refine.seed={seed}", *roverrides)
                    steps = max(1, images // rcfg.refine.global_batch)
                    rcfg = self.config(*overrides, f"pretrain.seed={seed}", f"refine.seed={seed}", *roverrides,
                                       f"refine.steps={steps}", "refine.epochs=null")
                    r = self.kept(rcfg, manifest, ("refine", seed, start_at, total),
                                  lambda: train(rcfg, "refine", manifest, data, start=start_weights))
                    rows.setdefault(name, []).append(self.score(r.ema, rcfg, f"refine-{grouping}-{name}-{seed}"))
                    print(f"  {grouping} seed {seed} {name}: {rows[name][-1].markdown(name)} ({r.seconds:.0f} s)", flush=True)
            what = f"{grouping}: refinement from {1 - self.args.refine_share:g} of pretraining, against {self.protocol.split}/"
            print(f"\n{HEADER.format(what=what, extra='', sep='')}")
            for name, r in rows.items():
                print(self.pooled(r).markdown(name), flush=True)

    def table_loss(self) -> None:
        """Under- or overfitting: each model's training loss on as many train/ rows as the split holds
        images, beside its loss on the split's images, with the same draws of noise, t and labels."""
        if self.protocol.image_size != self.codec.image_size:
            raise SystemExit(f"--tables loss: the evaluator's images are {self.protocol.image_size} px, the "
                             f"tokens' {self.codec.image_size} px (fid.domain.image_size vs encode.image_size)")
        heldout = rows_of(self.codec, self.protocol.reference)
        n = len(heldout[latents.LABEL])
        seen = {k: v[:n] for k, v in self.data.items() if k in heldout}
        models = [(self.args.weights, load_kept(self.args.weights).ema)] if self.args.weights else []
        for name, overrides in [parse(v) for v in self.args.variant] or ([] if models else [("config", [])]):
            for seed in self.args.train_seeds:
                models.append((f"{name} / seed {seed}", self.pretrained(self.config(*overrides, f"pretrain.seed={seed}"), seed).ema))
        split = self.protocol.split
        print(f"\n| model | loss on train/ rows | loss on {split}/ images | {split}/ - train/ (paired) | rows |\n|---|---|---|---|---|")
        for name, model in models:
            seen_loss = flow_loss(model, seen, hflip_rows=self.cfg.data.hflip)
            held_loss = flow_loss(model, heldout, hflip_rows=self.cfg.data.hflip)
            gap = [h - s for h, s in zip(held_loss, seen_loss)]
            cells = [f"{statistics.fmean(v):.4f} ± {statistics.stdev(v):.4f}" for v in (seen_loss, held_loss, gap)]
            print(f"| {name} | {' | '.join(cells)} | {n} vs {n} |", flush=True)

    def table_sweep(self) -> None:
        variants = [parse(v) for v in self.args.variant] or [("config", [])]
        samplings = [parse(s) for s in self.args.sample] or [("config", [])]
        print(f"\n{HEADER.format(what=f'variant / stage / sampling, against {self.protocol.split}/', extra=' train s |', sep='---|')}")
        for name, overrides in variants:
            for seed in self.args.train_seeds:
                cfg = self.config(*overrides, f"pretrain.seed={seed}")
                pre = self.pretrained(cfg, seed)
                models = [("pretrain", pre, [])]
                for rname, roverrides in map(parse, self.args.refine):
                    rcfg = self.config(*overrides, *roverrides, f"refine.seed={seed}")
                    models.append((f"refine {rname}", train(rcfg, "refine", self.manifest, self.data,
                                                            steps=self.steps(rcfg, "refine"),
                                                            start=pre.ema.state_dict()), roverrides))
                for stage, t, roverrides in models:
                    for sname, soverrides in samplings:
                        scfg = self.config(*overrides, *roverrides, *soverrides)
                        row = self.score(t.ema, scfg, f"sweep-{name}-{stage}-{sname}-{seed}")
                        print(row.markdown(f"{name} / {stage} / {sname} / seed {seed}", f" {t.seconds:.0f} |"), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="an ImageNet-layout folder with train/, val/ and test/")
    p.add_argument("--config", default="configs/mnist.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--work", required=True, help="latents, the evaluator and grids are kept here")
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="val to choose settings, test to report (the floor is the other split)")
    p.add_argument("--tables", default="floor,sweep")
    p.add_argument("--weights", help="a model kept under --work/models: the one the guidance table samples")
    p.add_argument("--runs", nargs="*", default=[], help="`sar run` directories to score (the runs table)")
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--sample-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--per-class", type=int, default=50, help="samples per class of every set")
    p.add_argument("--steps-scale", type=float, default=1.0, help="the share of each stage's steps trained here")
    p.add_argument("--refine-share", type=float, default=0.1, help="the refine table: the share of pretraining replaced")
    p.add_argument("--refine-groupings", nargs="+", default=["next-neighbour", "next-scale"])
    p.add_argument("--variant", action="append", default=[], help="'NAME: KEY=VALUE ...' training settings (sweep)")
    p.add_argument("--sample", action="append", default=[], help="'NAME: KEY=VALUE ...' sampling settings")
    p.add_argument("--refine", action="append", default=[], help="'NAME: KEY=VALUE ...' refine settings")
    p.add_argument("--quick", action="store_true", help="development: 1 train seed, 2 sample seeds, 20 a class, 1/5 steps")
    args = p.parse_args()
    if args.quick:
        args.train_seeds, args.sample_seeds = args.train_seeds[:1], args.sample_seeds[:2]
        args.per_class, args.steps_scale = min(args.per_class, 20), args.steps_scale / 5
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    t0 = time.perf_counter()
    bench = Bench(args)
    print(f"quality benchmark: {args.config} {' '.join(args.overrides)} on {args.source}, against {args.split}/; "
          f"train seeds {args.train_seeds}, sample seeds {args.sample_seeds}, {args.per_class} a class, steps x "
          f"{args.steps_scale:g}; {torch.get_num_threads()} torch threads, load {os.getloadavg()[0]:.1f}", flush=True)
    for table in filter(None, args.tables.split(",")):
        getattr(bench, f"table_{table}")()
    print(f"\n{time.perf_counter() - t0:.0f} s in all; load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()

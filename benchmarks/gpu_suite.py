"""One prepared GPU run: SAR-B training MFU with each candidate improvement on and off, the time
of 50,000 samples with the shipped sampler (decode included), peak memory, and a profiler summary
of where a training step's time goes; one JSON and a text table, rewritten after every row.

    python3 benchmarks/gpu_suite.py --out DIR                     # the GPU machine, its own python3
    uv run python benchmarks/gpu_suite.py --dry-run --out DIR     # CPU: tiny sizes, seconds

The exact command for the device tool, and the figures: docs/benchmarks.md, section "GPU".

It needs torch and this repository's models/ and pipelines/ only, as the GPU machine's image has
no pydantic, Ray or diffusers: the shipped sampler's settings come from the ImageNet config through
jobs.config where pydantic imports, else from the YAML's sample section; the KL-VAE decode needs
diffusers (carried there as a wheel) and without it the sampling rows are generation only, each
saying so. Every section runs inside its share of --budget-s (SECTIONS; a section's unused time
passes to the next): a case that would not fit is recorded as skipped, a failing one (out of
memory included) with its error, and a watchdog writes what there is and stops the run
--grace-s after the budget.

  env     device, versions, the two ceilings: a bf16 8192^3 matmul and a device-to-device copy
  sample  the decoder alone at several chunk sizes; the shipped sampler (the ImageNet config's
          solver, steps and guidance) at the config's batch and at a large one, eager and with
          the compiled head; Euler 50
  train   SAR-B steps in bf16 autocast at the config's micro-batch (64). 'loop' is the training
          loop's own step (pipelines/train/worker.py: train_step, as shipped: foreach AdamW, the
          EMA's AveragedModel, the per-third loss metrics, the batch from host memory); the other
          rows are a lean step (forward, backward, clip, AdamW, the EMA's own update function) with
          one candidate each: fused AdamW, SDPA's masks cached as additive bf16 with aligned rows,
          cuDNN attention, FlexAttention at block sizes 128 and 64, torch.compile of each block or
          of the whole objective, each eager and as one CUDA graph of the whole step; a
          torch.profiler summary (top kernels, their share, the idle gaps between them) of some
  extra   the best same-model setting at larger micro-batches; the flow head's batch multiplier
          and width (these change the model); compile modes max-autotune and reduce-overhead
  sar-l   SAR-L at the same micro-batch
MFU: benchmarks/bench_models.py's FLOP count (train_flops_per_image) against the datasheet's dense
bf16 peak (PEAK_BF16_FLOPS); each row also gives its share of the matmul ceiling measured in env.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import gzip
import importlib.metadata
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # the GPU machine runs this file with the repository not installed

import torch  # noqa: E402

from benchmarks.bench_models import PEAK_BF16_FLOPS, sync, timed, train_flops_per_image  # noqa: E402
from benchmarks.bench_models import batch as random_batch  # noqa: E402
from models import Guidance, build_model, count_parameters  # noqa: E402
from models import sar as sar_model  # noqa: E402
from pipelines.core import storage  # noqa: E402
from pipelines.data.latents import LABEL, LOGVAR, LOGVAR_FLIP, MEAN, MEAN_FLIP  # noqa: E402
from pipelines.evaluate import sampling  # noqa: E402
from pipelines.train import worker  # noqa: E402
from pipelines.train.objectives import PretrainObjective, group_buckets  # noqa: E402
from pipelines.train.optim import make_ema, make_optimizer, make_scheduler  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "imagenet256-sar-b-klvae.yaml")  # the shipped sampler
JSON_NAME, TABLE_NAME = "gpu_suite.json", "gpu_suite.txt"
# The sections in order, with their shares of --budget-s. Sampling goes before training: its time is
# predictable, while a compilation that overruns its estimate can only eat into what follows it.
SECTIONS = {"env": 0.02, "sample": 0.25, "train": 0.48, "extra": 0.15, "sar-l": 0.10}
NUM_SAMPLES = 50_000  # the evaluation set (ADM's protocol, DESIGN 5)
# The optimizer's, clipping's and EMA's values do not change a step's cost; these stand in for the config's.
TRAIN = SimpleNamespace(steps=1_000_000, ema_decay=0.9999, optim=SimpleNamespace(
    lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, warmup_steps=0, schedule="constant", grad_clip=3.0))
TRACE_LIMIT = 15 << 20  # a kept trace (gzip) stays under the GPU machine's 16 MiB per returned file


@dataclass(frozen=True)
class Sizes:
    """How large each measurement is: SAR-B on a GPU, or tiny for the CPU dry-run."""

    preset: str                       # the model trained and sampled (SAR-B)
    large: tuple[str, tuple]          # the larger model of the last section (SAR-L), with overrides
    model: dict                       # the token space: token_dim, grid, classes (ImageNet's kl16 latents)
    batch: int                        # micro-batch per GPU: jobs/config.py's pretrain.micro_batch
    sweep: tuple[int, ...]            # larger micro-batches for the best setting
    head_widths: tuple[int, ...]      # the flow head's widths tried besides the preset's
    warmup: int                       # untimed steps after the first
    iters: int                        # steps per timed window
    windows: int                      # timed windows (their median is the figure)
    profile_steps: int
    sample_batch: int                 # the large sampling batch
    sample_min_s: float               # each sampling row times batches for at least this long
    flow_steps_cap: int | None        # the dry-run caps the head's ODE steps
    decode_images: int
    decode_chunks: tuple[int, ...]
    kl16_levels: tuple[int, ...]      # the decoder's channels per level (MAR's kl16: 5 levels)
    matmul_n: int
    copy_bytes: int
    estimates: bool                   # the cases' GPU time estimates apply (the dry-run runs all)


GPU = Sizes(preset="sar-b", large=("sar-l", ()), model=dict(token_dim=16, height=16, width=16, num_classes=1000),
            batch=64, sweep=(128, 256), head_widths=(512, 1536), warmup=3, iters=8, windows=3, profile_steps=2,
            sample_batch=512, sample_min_s=4.0, flow_steps_cap=None, decode_images=256,
            decode_chunks=(32, 64, 128, 256), kl16_levels=(128, 128, 256, 256, 512), matmul_n=8192,
            copy_bytes=2 << 30, estimates=True)
DRY = Sizes(preset="tiny", large=("tiny", (("depth", 3),)), model=dict(token_dim=16, height=4, width=4, num_classes=10),
            batch=2, sweep=(4,), head_widths=(32, 96), warmup=0, iters=1, windows=2, profile_steps=1, sample_batch=3,
            sample_min_s=0.0, flow_steps_cap=2, decode_images=5, decode_chunks=(2, 5), kl16_levels=(8, 16),
            matmul_n=256, copy_bytes=1 << 20, estimates=False)


def num(x: float | None, digits: int = 4) -> float | None:
    """A finite float rounded for the JSON, else None."""
    if x is None or x != x or x in (float("inf"), float("-inf")):
        return None
    return round(float(x), digits)


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


# The run's clock and report -----------------------------------------------------------------
class Clock:
    """--budget-s split into SECTIONS' shares. A section's deadline counts from the start of the
    run, so the time a section leaves unused passes to the next."""

    def __init__(self, budget_s: float):
        self.start, self.budget, self.deadline = time.perf_counter(), budget_s, time.perf_counter() + budget_s

    def enter(self, section: str) -> None:
        names = list(SECTIONS)
        share = sum(SECTIONS[n] for n in names[:names.index(section) + 1])
        self.deadline = self.start + share * self.budget

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class Report:
    """The run's results: rewritten whole (atomically, pipelines/core/storage.py) as JSON and as a
    text table after every change, so that a run stopped at any point leaves what it measured."""

    def __init__(self, out: str, data: dict[str, Any], clock: Clock):
        self.out, self.data, self.clock = out, data, clock
        self.lock = threading.RLock()

    def add(self, section: str, row: dict[str, Any]) -> None:
        with self.lock:
            self.data.setdefault(section, []).append(row)
            self.save()
        print(f"  {section}: {row_line(section, row)}", flush=True)

    def set(self, **fields: Any) -> None:
        with self.lock:
            self.data.update(fields)
            self.save()

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        with self.lock:
            self.data.setdefault("notes", []).append(text)
            self.save()

    def save(self) -> None:
        with self.lock:
            self.data["elapsed_s"] = num(self.clock.elapsed(), 1)
            self.data.update(headlines(self.data))
            storage.write_json(os.path.join(self.out, JSON_NAME), self.data)
            storage.write_text(os.path.join(self.out, TABLE_NAME), table(self.data))

    def stop(self, why: str) -> None:
        """The watchdog's end: what there is, written, then the process exits (status 3)."""
        if self.lock.acquire(timeout=20):
            self.data["stopped"] = why
            self.save()
        print(f"gpu_suite: stopped: {why}", file=sys.stderr, flush=True)
        os._exit(3)


def headlines(data: dict[str, Any]) -> dict[str, Any]:
    """The figures the docs quote: SAR-B's best MFU without changing the model (and the loop's
    own, as shipped), and the 50,000-image time of the shipped sampler with its decode."""
    ok = [r for r in data.get("train", []) if r["status"] == "ok" and r.get("mfu") is not None]
    main = [r for r in ok if r["model"] == "main" and r["same_model"]]
    best = max(main, key=lambda r: r["mfu"], default=None)
    loop = next((r for r in main if r["mode"] == "loop"), None)
    large = max((r for r in ok if r["model"] == "large"), key=lambda r: r["mfu"], default=None)
    shipped = [r for r in data.get("sample", []) if r["status"] == "ok" and r["shipped_sampler"] and r["decode"]]
    fastest = max(shipped, key=lambda r: r["images_per_s"], default=None)
    return {
        "mfu_sar_b": best and best["mfu"],
        "mfu_sar_b_case": best and f"{best['case']} | {best['mode']} | batch {best['batch']}",
        "mfu_sar_b_shipped": loop and loop["mfu"],
        "mfu_sar_l": large and large["mfu"],
        "images_per_s_50k": fastest and fastest["images_per_s"],
        "minutes_50k": fastest and fastest["minutes_50k"],
        "sampler_50k": fastest and {k: fastest[k] for k in ("row", "solver", "flow_steps", "guidance", "batch",
                                                           "decode_batch", "compile_head")},
    }


# The training cases ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One training setting, measured in each of its modes: 'loop' (the training loop's own
    train_step), 'eager' (the lean step) and 'graph' (the lean step captured whole in a CUDA graph)."""

    name: str
    modes: tuple[str, ...] = ("eager", "graph")
    large: bool = False                # the larger model (SAR-L)
    batch: int | None = None           # None: Sizes.batch
    attention: str = "sdpa"            # SARConfig.attention: "sdpa" | "flex"
    additive_mask: bool = False        # SDPA's cached masks as additive ones in the compute dtype, rows aligned
    sdpa_backend: str | None = None    # None: torch's choice; "cudnn"
    flex_block: int | None = None      # FlexAttention's BlockMask tile (None: torch's 128)
    fused: bool = True                 # fused AdamW (else foreach, as the loop's)
    compile: str | None = None         # "regional" (each block) | a torch.compile mode of the objective
    head: tuple = ()                   # (field, value) overrides of the flow head: another model
    est_s: float = 12.0                # a guess of its seconds on the H200, for the time box
    profile: tuple[str, ...] = ()      # the modes whose steps are profiled
    trace: str | None = None           # keep the first profiled trace as trace_{trace}.json.gz


CORE = (
    Case("loop (worker.train_step, as shipped)", modes=("loop",), fused=False, est_s=10, profile=("loop",),
         trace="loop"),
    Case("fused AdamW", profile=("eager", "graph"), trace="fused"),
    Case("fused AdamW, compile each block", compile="regional", est_s=45, profile=("eager",)),
    Case("fused AdamW, compile the objective", compile="default", est_s=100),
    Case("foreach AdamW", modes=("eager",), fused=False, est_s=8),
    Case("fused AdamW, additive bf16 masks", additive_mask=True),
    Case("fused AdamW, cuDNN attention", sdpa_backend="cudnn"),
    Case("fused AdamW, FlexAttention 128", attention="flex", est_s=35),
    Case("fused AdamW, FlexAttention 64", attention="flex", flex_block=64, est_s=30),
)
COMPILE_MODES = (
    Case("fused AdamW, compile the objective, max-autotune-no-cudagraphs", compile="max-autotune-no-cudagraphs",
         est_s=240),
    Case("fused AdamW, compile the objective, reduce-overhead", compile="reduce-overhead", modes=("eager",),
         est_s=100),
)
LARGE = (
    Case("loop (worker.train_step, as shipped)", large=True, modes=("loop",), fused=False, est_s=25),
    Case("fused AdamW", large=True, est_s=25),
    Case("fused AdamW, compile each block", large=True, compile="regional", est_s=60),
)


def cpu_skip(case: Case, mode: str) -> str | None:
    """Why a mode of a case does not run on the CPU (the dry-run), or None."""
    if mode == "graph":
        return "CUDA graphs need CUDA"
    if case.sdpa_backend:
        return "cuDNN attention needs CUDA"
    if case.attention == "flex":
        return "FlexAttention's backward needs CUDA (torch has no CPU flex backward)"
    if case.compile:
        return "torch.compile is measured on the GPU only (minutes of C++ builds on a CPU)"
    return None


@dataclass
class Setup:
    """A built case: the model, its objective as called, the optimizer, the EMA, a batch on the device."""

    model: Any
    objective: Any
    call: Callable
    opt: Any
    ema: Any
    params: list
    ema_params: list
    x: torch.Tensor
    labels: torch.Tensor
    amp: bool
    device: torch.device


def model_overrides(ctx, case: Case) -> tuple[str, dict]:
    preset, extra = ctx.sizes.large if case.large else (ctx.sizes.preset, ())
    return preset, {**ctx.sizes.model, **dict(extra), **dict(case.head), "attention": case.attention}


def build_seeded(preset: str, overrides: dict, device: torch.device):
    """The model of a preset, initialised on the device from seed 0: every case of one model has
    the same weights (the attention backend creates no parameters)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(preset, **overrides)
    return model.to(device).train()


def build(case: Case, ctx) -> Setup:
    preset, overrides = model_overrides(ctx, case)
    if case.compile:
        torch._dynamo.reset()  # each case compiles afresh, within dynamo's recompile limit
    model = build_seeded(preset, overrides, ctx.device)
    ema = make_ema(model, TRAIN.ema_decay).to(ctx.device)  # as worker.prepare; before compiling: plain modules
    objective = PretrainObjective(model)
    call: Callable = objective
    if case.compile == "regional":  # one compiled graph serves every block (same code, parameters as inputs)
        for module in (*model.backbone.blocks, *model.head.blocks):
            module.compile()  # dynamic left to dynamo: a value that differs between blocks must not specialise
    elif case.compile:
        compiled = torch.compile(objective, mode=None if case.compile == "default" else case.compile, dynamic=False)
        call = compiled
        if case.compile == "reduce-overhead":  # its CUDA graphs' outputs live until the next step begins
            def call(x, labels):
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(x, labels)
    opt = make_optimizer(objective, TRAIN)  # the loop's parameter groups (no decay on norms, biases, embeddings)
    graph = "graph" in case.modes and ctx.device.type == "cuda"
    if case.fused or graph:  # the same groups, fused and/or capturable (a CUDA graph replays its step count)
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
        opt = torch.optim.AdamW(groups, lr=TRAIN.optim.lr, betas=TRAIN.optim.betas, fused=case.fused or None,
                                capturable=graph)
    params = [p for p in objective.parameters() if p.requires_grad]
    torch.manual_seed(1)
    x, labels = random_batch(model, case.batch or ctx.sizes.batch, ctx.device)
    return Setup(model, objective, call, opt, ema, params, list(ema.module.parameters()), x, labels,
                 amp=ctx.device.type == "cuda", device=ctx.device)


def lean_step(s: Setup, zero_grad: bool = True) -> None:
    """One optimizer step as the loop's, without its per-step host work: forward and backward in
    bf16 autocast, clipping, AdamW, and the EMA through make_ema's own averaging function (its
    AveragedModel.update_parameters reads its step counter on the host, a sync every step).
    Autocast's cast cache is off in every mode: a CUDA graph cannot keep its casts, and one setting
    keeps a compiled objective from recompiling between modes (no weight is cast twice in a step)."""
    if zero_grad:
        s.opt.zero_grad(set_to_none=True)
    with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.amp, cache_enabled=False):
        loss = s.call(s.x, s.labels)[0]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(s.params, TRAIN.optim.grad_clip)
    s.opt.step()
    s.ema.multi_avg_fn(s.ema_params, s.params, None)


def capture(s: Setup) -> Callable[[], None]:
    """The lean step captured whole (forward, backward, clip, AdamW, EMA) in one CUDA graph, as torch's
    "whole network capture" (CUDA semantics notes): warm-up on a side stream, gradients None at the
    capture so that the captured backward allocates them in the graph's pool. A replay launches the
    step's kernels as one."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            lean_step(s)
    torch.cuda.current_stream().wait_stream(side)
    s.opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lean_step(s, zero_grad=False)
    return graph.replay


def latent_rows(model, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A micro-batch as the loop reads it: float16 posterior moments of each image and its flip
    (encode's default storage), and labels, in host memory."""
    c = model.config
    shape = (n, c.height, c.width, c.token_dim)

    def moments():
        return torch.randn(shape, generator=gen).half()

    return {LABEL: torch.randint(c.num_classes, (n,), generator=gen), MEAN: moments(), MEAN_FLIP: moments(),
            LOGVAR: moments() - 4, LOGVAR_FLIP: moments() - 4}


def loop_step(s: Setup) -> Callable[[], None]:
    """The training loop's own step (worker.train_step) on a Trainer as worker.prepare builds one
    for a single GPU: the objective, its AveragedModel EMA, foreach AdamW, the constant schedule."""
    g = s.model.grouping
    t = worker.Trainer(s.objective, s.ema, s.opt, make_scheduler(s.opt, TRAIN), s.objective, s.device, fsdp=False,
                       grad_clip=TRAIN.optim.grad_clip, amp=s.amp, hflip=True,
                       buckets={k: v.to(s.device) for k, v in group_buckets(g.group_index, g.num_groups).items()})
    gen = torch.Generator().manual_seed(0)
    micro, window = [latent_rows(s.model, s.x.shape[0], gen)], {}
    return lambda: worker.train_step(t, micro, gen, window, log_metrics=False)


def make_step(s: Setup, mode: str) -> Callable[[], None]:
    if mode == "loop":
        return loop_step(s)
    if mode == "graph":
        return capture(s)
    return functools.partial(lean_step, s)


def time_steps(make: Callable[[], Callable[[], None]], device: torch.device,
               sizes: Sizes) -> tuple[Callable[[], None], dict[str, float | None]]:
    """The step `make` returns, and its timings: the seconds to make it and run it once (compilation,
    capture), then after the warm-up the median ms per step over `windows` windows of `iters`
    steps, each window synchronised once at its end."""
    start = time.perf_counter()
    step = make()
    step()
    sync(device)
    first = time.perf_counter() - start
    for _ in range(sizes.warmup):
        step()
    sync(device)
    per = []
    for _ in range(sizes.windows):
        start = time.perf_counter()
        for _ in range(sizes.iters):
            step()
        sync(device)
        per.append((time.perf_counter() - start) / sizes.iters)
    median = statistics.median(per)
    return step, {"first_step_s": num(first, 2), "ms_per_step": num(median * 1e3, 2),
                  "spread_pct": num((max(per) - min(per)) / median * 100, 1)}


# Attention variants ------------------------------------------------------------------------------
@contextlib.contextmanager
def isolated_masks():
    """models/sar.py's mask cache emptied for the duration and restored after: the masks a case
    builds (other block sizes, other dtypes) are its own."""
    saved = dict(sar_model._BLOCK_MASKS)
    sar_model._BLOCK_MASKS.clear()
    try:
        yield
    finally:
        sar_model._BLOCK_MASKS.clear()
        sar_model._BLOCK_MASKS.update(saved)


@contextlib.contextmanager
def flex_block_size(block: int):
    """FlexAttention's BlockMasks built with `block` x `block` tiles (torch's default is 128):
    models/sar.py's create_block_mask handed the BLOCK_SIZE for the duration."""
    original = sar_model.create_block_mask
    sar_model.create_block_mask = functools.partial(original, BLOCK_SIZE=block)
    try:
        yield
    finally:
        sar_model.create_block_mask = original


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where the bool `mask` allows, -inf elsewhere, in `dtype`, as a view of a buffer whose rows
    are padded to a multiple of 16 elements. SDPA converts a bool mask to this form on every call,
    and its memory-efficient kernel copies a bias whose row stride is not a multiple of 8 into a
    padded one on every call too (preprocess_mask, aten/src/ATen/native/transformers/attention.cpp)."""
    rows, cols = mask.shape
    buffer = torch.full((rows, -(-cols // 16) * 16), float("-inf"), dtype=dtype, device=mask.device)
    out = buffer[:, :cols]
    out.masked_fill_(mask, 0.0)
    return out


@contextlib.contextmanager
def additive_masks(model, device: torch.device, dtype: torch.dtype):
    """The model's cached SDPA masks (models/sar.py: attention_mask) replaced by `additive` ones."""
    mask = model.attention_mask(device, split=True)  # built and cached as bool
    key = next(k for k, v in sar_model._BLOCK_MASKS.items() if v is mask)
    if isinstance(mask, sar_model.PrefixMask):
        sar_model._BLOCK_MASKS[key] = sar_model.PrefixMask(additive(mask.head, dtype), additive(mask.tail, dtype),
                                                           mask.prefix)
    else:
        sar_model._BLOCK_MASKS[key] = additive(mask, dtype)
    try:
        yield
    finally:
        sar_model._BLOCK_MASKS[key] = mask


@contextlib.contextmanager
def case_context(case: Case):
    """The case's attention settings: an SDPA backend, a FlexAttention tile; its own mask cache."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(isolated_masks())
        if case.sdpa_backend == "cudnn":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([SDPBackend.CUDNN_ATTENTION]))
        if case.flex_block:
            stack.enter_context(flex_block_size(case.flex_block))
        yield stack


def z_error(s: Setup, reference: tuple) -> float:
    """||z - z_ref|| / ||z_ref||: the backbone's output on a few examples in the case's precision
    against the same weights in fp32 with the shipped attention (SDPA, bool masks). An attention
    variant must compute the model's function (bf16 operands land near 1e-3 to 1e-2; NaN never passes)."""
    x, labels, z_ref = reference
    with torch.no_grad(), torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.amp):
        z = s.model(x, labels, drop_labels=torch.zeros_like(labels, dtype=torch.bool))
    return float((z.float() - z_ref).norm() / z_ref.norm())


# The profiler's summary --------------------------------------------------------------------------
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
KERNEL_CLASSES = (("attention", r"fmha|flash|attention|attn|cudnn|flex"),
                  ("matmul", r"gemm|cutlass|xmma|nvjet|wgmma|cublas|triton_tem"),
                  ("memory", r"memcpy|memset"))  # by kernel name; the rest is "other" (elementwise, norms, reductions)


def trace_summary(events: list[dict], steps: int, top: int = 8, gap_us: float = 20.0) -> dict[str, Any]:
    """Where a profiled window of `steps` steps went, from its Chrome-trace events: the device's busy
    time (the union of its kernels' intervals), the idle gaps between kernels (host overhead: the
    device waits on launches or a sync), the kernels taking most time with their share of all
    kernel time, and that time split by kernel class. A CPU run has no kernels: its CPU ops
    stand in (they nest, so their shares overlap)."""
    source = "kernel"
    spans = [e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES]
    if not spans:
        source = "cpu_op"
        spans = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    if not spans:
        return {"source": None, "steps": steps}
    intervals = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in spans)
    busy, gaps = 0.0, []
    start, end = intervals[0]
    for s, e in intervals[1:]:
        if s > end:
            busy, start = busy + end - start, s
            gaps.append(s - end)
            end = e
        else:
            end = max(end, e)
    busy += end - start
    window = max(e for _, e in intervals) - intervals[0][0]
    per_name: dict[str, list[float]] = {}
    for e in spans:
        acc = per_name.setdefault(e["name"], [0.0, 0])
        acc[0] += float(e.get("dur", 0.0))
        acc[1] += 1
    total = sum(v[0] for v in per_name.values()) or 1.0
    classes: dict[str, float] = {}
    for name, (dur, _) in per_name.items():
        cls = next((c for c, pattern in KERNEL_CLASSES if re.search(pattern, name, re.IGNORECASE)), "other")
        classes[cls] = classes.get(cls, 0.0) + dur
    long_gaps = sorted((g for g in gaps if g >= gap_us), reverse=True)
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "source": source, "steps": steps, "window_ms": num(window / 1e3, 3), "busy_ms": num(busy / 1e3, 3),
        "busy_share": num(busy / window if window else 1.0), "idle_ms": num((window - busy) / 1e3, 3),
        "gap_threshold_us": gap_us, "gaps": len(long_gaps), "gaps_ms": num(sum(long_gaps) / 1e3, 3),
        "largest_gaps_ms": [num(g / 1e3, 3) for g in long_gaps[:3]],
        "kernels_per_step": num(len(spans) / steps, 1), "mean_kernel_us": num(total / len(spans), 2),
        "top": [{"name": name[:100], "ms_per_step": num(dur / 1e3 / steps, 3), "share": num(dur / total),
                 "calls_per_step": num(n / steps, 1)} for name, (dur, n) in ranked],
        "classes": {c: num(v / total) for c, v in sorted(classes.items(), key=lambda kv: -kv[1])},
    }


def profile_steps(step: Callable[[], None], device: torch.device, steps: int, keep: str | None) -> dict[str, Any]:
    """torch.profiler over `steps` steps, summarised (trace_summary); `keep`: where to write the
    trace, gzipped, when it is small enough to come back from the device."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, "rb") as f:
            raw = f.read()
    summary = trace_summary(json.loads(raw)["traceEvents"], steps)
    if keep:
        packed = gzip.compress(raw)
        if len(packed) <= TRACE_LIMIT:
            storage.write_bytes(keep, packed)
            summary["trace"] = os.path.basename(keep)
    return summary


# Sections -----------------------------------------------------------------------------------------
@dataclass
class Context:
    """What the sections share: the device, the sizes, the clock, the report, the best case so far."""

    device: torch.device
    sizes: Sizes
    clock: Clock
    report: Report
    out: str
    peak_flops: float | None = None
    matmul_flops: float | None = None
    best: tuple | None = None          # (mfu or images/s, case, mode) of the best same-model main row
    references: dict = field(default_factory=dict)

    def reference(self, case: Case) -> tuple:
        """(x, labels, z) of the case's model in fp32 with the shipped attention, once per model."""
        if case.large not in self.references:
            preset, overrides = model_overrides(self, replace(case, attention="sdpa", head=()))
            model = build_seeded(preset, overrides, self.device)
            torch.manual_seed(2)
            x, labels = random_batch(model, 4, self.device)
            with torch.no_grad():
                z = model(x, labels, drop_labels=torch.zeros_like(labels, dtype=torch.bool)).float()
            self.references[case.large] = (x, labels, z)
            del model
        return self.references[case.large]

    def fits(self, est_s: float) -> bool:
        return self.clock.left() > (est_s if self.sizes.estimates else 0.0)

    def release(self) -> None:
        """The device memory of what was dropped, back (a full gc takes most of a second: CUDA only)."""
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    def peak_memory(self) -> dict[str, float | None]:
        if self.device.type != "cuda":
            return {"peak_alloc_gib": None, "peak_reserved_gib": None}
        return {"peak_alloc_gib": num(torch.cuda.max_memory_allocated() / 2**30, 2),
                "peak_reserved_gib": num(torch.cuda.max_memory_reserved() / 2**30, 2)}

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()


def env_section(ctx: Context) -> None:
    d = ctx.device
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if d.type == "cuda" else None}
    if d.type == "cuda":
        props = torch.cuda.get_device_properties(d)
        info.update(device=props.name, multiprocessors=props.multi_processor_count,
                    memory_gib=num(props.total_memory / 2**30, 1))
        ctx.peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in props.name), None)
    else:
        info.update(device=f"cpu ({os.cpu_count()} cores)", multiprocessors=None, memory_gib=None)
    info["packages"] = {}
    for name in ("diffusers", "pydantic", "ray", "triton"):
        try:
            info["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info["packages"][name] = None
    info["peak_bf16_tflops"] = num(ctx.peak_flops / 1e12, 1) if ctx.peak_flops else None
    ctx.report.set(**info)
    measured = ceilings(ctx.sizes, d)
    ctx.matmul_flops = measured["matmul_tflops"] * 1e12
    ctx.report.set(ceilings=measured)
    ctx.release()


def ceilings(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """The device's two ceilings, measured: a square matmul (bf16 on the GPU) and a device-to-device
    copy (bytes read + written), each the fastest of ten after three warm-ups (bench_models.timed),
    on random data."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = sizes.matmul_n
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    src = torch.randn(sizes.copy_bytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    matmul = timed(lambda: a @ b, device, 10, warmup=3)
    copy = timed(lambda: dst.copy_(src), device, 10, warmup=3)
    return {"matmul_tflops": num(2 * n**3 / matmul / 1e12, 1), "matmul_n": n,
            "matmul_dtype": str(dtype).replace("torch.", ""), "copy_tb_s": num(2 * sizes.copy_bytes / copy / 1e12, 3),
            "copy_gib": num(sizes.copy_bytes / 2**30, 2)}


def train_row(ctx: Context, case: Case, mode: str) -> dict[str, Any]:
    preset, overrides = model_overrides(ctx, case)
    return {"case": case.name, "mode": mode, "model": "large" if case.large else "main", "preset": preset,
            "batch": case.batch or ctx.sizes.batch, "attention": case.attention, "additive_mask": case.additive_mask,
            "sdpa_backend": case.sdpa_backend, "flex_block": case.flex_block,
            "fused_adamw": case.fused and mode != "loop", "compile": case.compile, "cuda_graph": mode == "graph",
            "head": dict(case.head), "same_model": not case.head, "status": "skipped"}


def run_case(ctx: Context, case: Case, section: str = "train") -> None:
    """Measure each mode of a case on one built model; every mode's row is recorded, run or not."""
    rows = {mode: train_row(ctx, case, mode) for mode in case.modes}
    cpu = {mode: cpu_skip(case, mode) for mode in case.modes} if ctx.device.type == "cpu" else {}
    todo = [mode for mode in case.modes if not cpu.get(mode)]
    try:
        if todo and not ctx.fits(case.est_s):
            for mode in todo:
                ctx.report.add(section, {**rows[mode], "status": f"skipped: time box ({ctx.clock.left():.0f} s left "
                                                                f"of the section, the case needs ~{case.est_s:.0f} s)"})
        elif todo:
            measure_case(ctx, case, rows, todo, section)
    finally:  # the modes the CPU cannot run, after the others
        for mode, why in cpu.items():
            if why:
                ctx.report.add(section, {**rows[mode], "status": f"skipped: {why}"})


def measure_case(ctx: Context, case: Case, rows: dict[str, dict], todo: list[str], section: str) -> None:
    """The `todo` modes of a case on one built model, with the z check of its attention first."""
    check = case.compile is None and not case.head and "loop" not in case.modes
    s = None
    try:
        reference = ctx.reference(case) if check else None
        with case_context(case) as stack:
            ctx.reset_peak()
            start = time.perf_counter()
            s = build(case, ctx)
            setup_s = time.perf_counter() - start
            if case.additive_mask:
                stack.enter_context(additive_masks(s.model, ctx.device, torch.bfloat16 if s.amp else torch.float32))
            err = num(z_error(s, reference), 6) if reference is not None else None
            flops = train_flops_per_image(s.model)
            for mode in list(todo):
                rows[mode].update(setup_s=num(setup_s, 2), rel_err_z=err, gflop_per_image=num(flops / 1e9, 2),
                                  parameters_m=num(count_parameters(s.model) / 1e6, 1))
                todo.remove(mode)
                measure_mode(ctx, case, s, mode, rows[mode], flops, section)
    except Exception as err:  # the build failed (or out of memory): the modes not measured say why
        for mode in todo:
            ctx.report.add(section, {**rows[mode], "status": failure(err)})
    finally:
        del s
        ctx.release()


def failure(err: BaseException) -> str:
    return "out of memory" if isinstance(err, torch.cuda.OutOfMemoryError) else f"error: {one_line(err)}"


def measure_mode(ctx: Context, case: Case, s: Setup, mode: str, row: dict, flops: float, section: str) -> None:
    if not ctx.fits(0.0):
        ctx.report.add(section, {**row, "status": "skipped: time box (the section's time is spent)"})
        return
    try:
        ctx.reset_peak()
        step, timings = time_steps(lambda: make_step(s, mode), ctx.device, ctx.sizes)
        row.update(timings, **ctx.peak_memory())
        ips = row["batch"] / (row["ms_per_step"] / 1e3)
        row.update(images_per_s=num(ips, 1),
                   mfu=num(flops * ips / ctx.peak_flops) if ctx.peak_flops else None,
                   of_matmul_ceiling=num(flops * ips / ctx.matmul_flops) if ctx.matmul_flops else None,
                   status="ok")
        if mode in case.profile and ctx.fits(0.0):
            keep = None
            if case.trace and mode == case.profile[0]:
                keep = os.path.join(ctx.out, f"trace_{case.trace}.json.gz")
            row["profile"] = profile_steps(step, ctx.device, ctx.sizes.profile_steps, keep)
    except Exception as err:
        row["status"] = failure(err)
    ctx.report.add(section, row)
    if row["status"] == "ok" and row["same_model"] and row["model"] == "main" and row["batch"] == ctx.sizes.batch \
            and mode != "loop":
        score = row["mfu"] if row["mfu"] is not None else row["images_per_s"]
        if ctx.best is None or score > ctx.best[0]:
            ctx.best = (score, case, mode)


def train_section(ctx: Context) -> None:
    for case in CORE:
        run_case(ctx, case)


def extra_section(ctx: Context) -> None:
    if ctx.best is not None:
        _, case, mode = ctx.best
        for b in ctx.sizes.sweep:
            run_case(ctx, replace(case, batch=b, modes=(mode,), profile=(), trace=None, est_s=case.est_s + 10))
    heads = [Case(f"fused AdamW, head_batch_mul {m}", head=(("head_batch_mul", m),)) for m in (2, 1)]
    heads += [Case(f"fused AdamW, head_width {w}", head=(("head_width", w),)) for w in ctx.sizes.head_widths]
    for case in heads + list(COMPILE_MODES):
        run_case(ctx, case)


def large_section(ctx: Context) -> None:
    for case in LARGE:
        run_case(ctx, case, section="train")


def shipped_settings(path: str = CONFIG) -> tuple[sampling.SampleSettings, str | None]:
    """The sample settings of a config, and a note when they were read without jobs.config."""
    try:
        from jobs.config import load_config
    except ImportError as err:  # the GPU machine's image has no pydantic
        import yaml

        with open(path) as f:
            section = (yaml.safe_load(f) or {}).get("sample") or {}
        keys = ("guidance", "flow_steps", "solver", "temperature", "compile_head", "batch_size", "decode_batch")
        known = {k: section[k] for k in keys if k in section}
        note = (f"{os.path.relpath(path, REPO)}: jobs.config does not import ({one_line(err)}); the sample "
                f"section's {', '.join(known)} read from the YAML, the rest at SampleSettings' defaults")
        return sampling.SampleSettings(**known), note
    return sampling.SampleSettings.from_config(load_config(path).sample), None


def decoder(ctx: Context):
    """(the kl16-shaped codec on the device, None) or (None, why it is missing)."""
    from benchmarks.sample_throughput import kl16_codec

    try:
        codec = kl16_codec(ctx.sizes.kl16_levels, ctx.sizes.model["height"])
    except ImportError as err:
        return None, (f"the KL-VAE decode is left out of every sampling row: {one_line(err)} (carry diffusers "
                      f"as a wheel: docs/benchmarks.md, section GPU)")
    return codec.to(ctx.device).eval(), None


def sample_rows(ctx: Context, shipped: sampling.SampleSettings) -> list[tuple[str, sampling.SampleSettings, float]]:
    """(name, settings, estimated seconds) of each sampling row, most wanted first."""
    big = ctx.sizes.sample_batch
    euler = replace(shipped, solver="euler", flow_steps=50, batch_size=big)
    rows = [("shipped, the config's batch", shipped, 12),
            (f"shipped, batch {big}", replace(shipped, batch_size=big), 20),
            (f"shipped, batch {big}, compiled head", replace(shipped, batch_size=big, compile_head=True), 40),
            (f"Euler 50, batch {big}, compiled head", replace(euler, compile_head=True), 35)]
    if (shipped.solver, shipped.flow_steps) != ("heun", 13):
        rows.append((f"Heun 13, batch {big}", replace(shipped, solver="heun", flow_steps=13, batch_size=big), 20))
    rows += [(f"Euler 50, batch {big}", euler, 40),
             (f"shipped, batch {2 * big}, compiled head", replace(shipped, batch_size=2 * big, compile_head=True), 30)]
    return [(name, dry_sized(ctx, settings), est) for name, settings, est in rows]


def dry_sized(ctx: Context, settings: sampling.SampleSettings) -> sampling.SampleSettings:
    """The dry-run's few head steps and small batches; the settings themselves on the GPU."""
    if not ctx.sizes.flow_steps_cap:
        return settings
    return replace(settings, flow_steps=min(settings.flow_steps, ctx.sizes.flow_steps_cap),
                   batch_size=min(settings.batch_size, 2 * ctx.sizes.sample_batch))


def sample_section(ctx: Context) -> None:
    shipped, note = shipped_settings()
    if note:
        ctx.report.note(note)
    codec, why = decoder(ctx)
    if why:
        ctx.report.note(why)
    d = ctx.device
    model = build_seeded(ctx.sizes.preset, ctx.sizes.model, d).eval()
    plan = sampling.SamplePlan(model.config.num_classes, NUM_SAMPLES // model.config.num_classes, seed=0)
    if codec is not None:
        decode_rows(ctx, codec, model)
    target = dry_sized(ctx, shipped)
    for name, settings, est in sample_rows(ctx, shipped):
        row = {"row": name, "solver": settings.solver, "flow_steps": settings.flow_steps,
               "guidance": dict(settings.guidance), "batch": settings.batch_size,
               "decode_batch": settings.decode_batch if codec is not None else None,
               "compile_head": settings.compile_head, "decode": codec is not None,
               "shipped_sampler": (settings.solver, settings.flow_steps, Guidance(**settings.guidance))
               == (target.solver, target.flow_steps, Guidance(**target.guidance)), "status": "skipped"}
        if not ctx.fits(est):
            ctx.report.add("sample", {**row, "status": f"skipped: time box ({ctx.clock.left():.0f} s left, "
                                                       f"the row needs ~{est} s)"})
            continue
        try:
            row.update(time_sampling(ctx, model, codec, plan, settings), status="ok")
        except Exception as err:
            row["status"] = failure(err)
        ctx.report.add("sample", row)
        ctx.release()
    del model
    ctx.release()


def make_images(model, codec, plan, settings: sampling.SampleSettings, start: int, device: torch.device) -> int:
    """A batch of the evaluation set through the library's sampling path (decode included), or
    the generation alone where there is no decoder; returns the images made."""
    rows = plan.rows(range(start, start + settings.batch_size))
    if codec is not None:
        return len(settings.render(model, codec, rows, device))
    labels = torch.as_tensor(rows[sampling.LABEL], device=device)
    with sampling.autocast(device):
        tokens = model.generate(labels, seeds=rows[sampling.SEED], guidance=Guidance(**settings.guidance),
                                flow_steps=settings.flow_steps, **settings.sampler)
    sync(device)
    return tokens.shape[0]


def time_sampling(ctx: Context, model, codec, plan, settings) -> dict[str, Any]:
    """A warm-up batch (compilation, CUDA graphs, allocator), then batches for at least
    sample_min_s (at most four, fewer when the section's time runs short): images/s and the
    projected time of the 50,000."""
    d = ctx.device
    ctx.reset_peak()
    start = time.perf_counter()
    made = make_images(model, codec, plan, settings, 0, d)
    warm = time.perf_counter() - start
    made, start = 0, time.perf_counter()
    while True:
        made += make_images(model, codec, plan, settings, made + settings.batch_size, d)
        spent = time.perf_counter() - start
        per_batch = spent * settings.batch_size / made
        if spent >= ctx.sizes.sample_min_s or made >= 4 * settings.batch_size or ctx.clock.left() < per_batch:
            break
    ips = made / spent
    return {"warmup_s": num(warm, 2), "images": made, "seconds": num(spent, 2), "images_per_s": num(ips, 2),
            "minutes_50k": num(NUM_SAMPLES / ips / 60, 2), **ctx.peak_memory()}


def decode_rows(ctx: Context, codec, model) -> None:
    """The decoder alone (sampling.decode_images) at each chunk size: images/s and peak memory."""
    c, d = model.config, ctx.device
    torch.manual_seed(3)
    grid = torch.randn(ctx.sizes.decode_images, c.height, c.width, c.token_dim, device=d)
    for chunk in ctx.sizes.decode_chunks:
        row = {"decode_batch": chunk, "images": grid.shape[0], "status": "skipped"}
        if not ctx.fits(3.0):
            ctx.report.add("decode", {**row, "status": "skipped: time box"})
            continue
        try:
            ctx.reset_peak()
            sampling.decode_images(codec, grid[:chunk], chunk)  # warm-up: cuDNN's algorithm choice
            seconds = timed(lambda: sampling.decode_images(codec, grid, chunk), d, 2, warmup=0)
            row.update(images_per_s=num(grid.shape[0] / seconds, 1), seconds=num(seconds, 3), **ctx.peak_memory(),
                       status="ok")
        except Exception as err:
            row["status"] = failure(err)
        ctx.report.add("decode", row)
        ctx.release()


SECTION_RUNS = {"env": env_section, "train": train_section, "sample": sample_section, "extra": extra_section,
                "sar-l": large_section}


# The table ---------------------------------------------------------------------------------------
def fmt(v: Any, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    """v * scale in `spec` with `suffix`; '-' in the same width when v is None."""
    if v is None:
        return "-".rjust(int(re.match(r"\d*", spec).group() or 0) + len(suffix))
    return f"{v * scale if scale != 1.0 else v:{spec}}{suffix}"


def row_line(section: str, r: dict[str, Any]) -> str:
    if section == "train":
        return (f"{r['case'][:52]:52s}{r['preset']:>7s}{r['batch']:6d} {r['mode']:6s}"
                f"{fmt(r.get('ms_per_step'), '8.1f')}{fmt(r.get('images_per_s'), '8.0f')}"
                f"{fmt(r.get('mfu'), '6.1f', 100, '%')}{fmt(r.get('of_matmul_ceiling'), '6.1f', 100, '%')}"
                f"{fmt(r.get('peak_alloc_gib'), '7.1f')}{fmt(r.get('first_step_s'), '7.1f')}"
                f"{fmt(r.get('rel_err_z'), '9.1e')}  {r['status']}")
    if section == "sample":
        g = r["guidance"]
        guide = f"{g.get('kind')} {g.get('w_x', '')}/{g.get('w_z', '')}"
        return (f"{r['row'][:40]:40s}{r['solver']:>7s}{r['flow_steps']:6d} {guide:16s}{r['batch']:6d}"
                f"{fmt(r['decode_batch'], '5d')}{'  yes' if r['compile_head'] else '   no'}"
                f"{fmt(r.get('images_per_s'), '8.1f')}{fmt(r.get('minutes_50k'), '8.1f')}"
                f"{fmt(r.get('peak_alloc_gib'), '7.1f')}  {r['status']}")
    return (f"decode_batch {r['decode_batch']:4d}: {fmt(r.get('images_per_s'), '8.1f')} images/s, peak "
            f"{fmt(r.get('peak_alloc_gib'), '.1f')} GiB  {r['status']}")


def profile_lines(r: dict[str, Any]) -> list[str]:
    p = r["profile"]
    if not p.get("source"):
        return [f"  {r['case']} | {r['mode']}: no events"]
    what = "kernels" if p["source"] == "kernel" else "CPU ops (no device here; nested, shares overlap)"
    lines = [f"  {r['case']} | {r['mode']}, {p['steps']} steps: {what} busy {p['busy_ms']:.1f} of "
             f"{p['window_ms']:.1f} ms ({p['busy_share'] * 100:.0f}%); {p['gaps']} gaps over "
             f"{p['gap_threshold_us']:.0f} us, {p['gaps_ms']:.1f} ms, largest {p['largest_gaps_ms']} ms; "
             f"{p['kernels_per_step']:.0f} per step, mean {p['mean_kernel_us']:.1f} us",
             "    by class: " + ", ".join(f"{c} {s * 100:.0f}%" for c, s in p["classes"].items())]
    lines += [f"    {t['share'] * 100:5.1f}%  {t['ms_per_step']:8.3f} ms/step  {t['calls_per_step']:6.1f} calls  "
              f"{t['name'][:90]}" for t in p["top"]]
    return lines


def table(data: dict[str, Any]) -> str:
    ceil = data.get("ceilings") or {}
    lines = [f"gpu_suite: {data.get('device')}, torch {data.get('torch')}, CUDA {data.get('cuda')}, cuDNN "
             f"{data.get('cudnn')}, python {data.get('python')}; budget {data.get('budget_s')} s, ran "
             f"{data.get('elapsed_s')} s{'; DRY RUN (tiny, CPU)' if data.get('dry_run') else ''}",
             f"ceilings: {ceil.get('matmul_dtype')} {ceil.get('matmul_n')}^3 matmul {ceil.get('matmul_tflops')} "
             f"TFLOP/s, device copy {ceil.get('copy_tb_s')} TB/s (read + write); MFU against "
             f"{data.get('peak_bf16_tflops')} TFLOP/s (datasheet dense bf16)"]
    if data.get("stopped"):
        lines.append(f"STOPPED: {data['stopped']}")
    lines += ["", "train (bf16 autocast; a step: forward, backward, clip, AdamW, EMA; mode loop = the training "
              "loop's train_step, eager = the lean step, graph = the lean step as one CUDA graph)",
              f"{'case':52s}{'model':>7s}{'batch':>6s} {'mode':6s}{'ms/step':>8s}{'img/s':>8s}{'MFU':>7s}"
              f"{'of mm':>7s}{'GiB':>7s}{'first':>7s}{'z err':>9s}  status"]
    lines += [row_line("train", r) for r in data.get("train", [])]
    profiled = [r for r in data.get("train", []) if r.get("profile")]
    if profiled:
        lines += ["", "profiles (torch.profiler; gaps = the device idle between kernels)"]
        for r in profiled:
            lines += profile_lines(r)
    if data.get("decode"):
        lines += ["", "decode alone (kl16-shaped KL-VAE, random weights, fp32 as sampling.render runs it)"]
        lines += ["  " + row_line("decode", r) for r in data["decode"]]
    lines += ["", f"sample ({NUM_SAMPLES:,} images projected from the timed batches; decode included unless "
              "a note says otherwise)",
              f"{'row':40s}{'solver':>7s}{'steps':>6s} {'guidance':16s}{'batch':>6s}{'dec':>5s}{'comp':>5s}"
              f"{'img/s':>8s}{'50K min':>8s}{'GiB':>7s}  status"]
    lines += [row_line("sample", r) for r in data.get("sample", [])]
    if data.get("notes"):
        lines += ["", "notes:"] + [f"  {n}" for n in data["notes"]]
    lines += ["", f"mfu_sar_b {fmt(data.get('mfu_sar_b'), '.1f', 100, '%')} ({data.get('mfu_sar_b_case')}); "
              f"as shipped {fmt(data.get('mfu_sar_b_shipped'), '.1f', 100, '%')}; SAR-L best "
              f"{fmt(data.get('mfu_sar_l'), '.1f', 100, '%')}",
              f"50K with the shipped sampler, decode included: {fmt(data.get('images_per_s_50k'), '.1f')} images/s, "
              f"{fmt(data.get('minutes_50k'), '.1f')} min ({(data.get('sampler_50k') or {}).get('row')})"]
    return "\n".join(lines) + "\n"


# Main ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: every path, in seconds")
    p.add_argument("--budget-s", type=float, default=450.0, help="the run's time, split into SECTIONS' shares")
    p.add_argument("--grace-s", type=float, default=30.0, help="past the budget, the watchdog writes and stops")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    args = p.parse_args(argv)
    if not args.out:
        print("gpu_suite: error: --out: no output folder (and $OUT is not set)", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: error: no CUDA device here; --dry-run runs the tiny CPU version", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    clock = Clock(args.budget_s)
    report = Report(args.out, {"suite": "benchmarks/gpu_suite.py", "argv": sys.argv[1:] if argv is None else argv,
                               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "dry_run": args.dry_run, "budget_s": args.budget_s, "train": [], "decode": [],
                               "sample": [], "notes": []}, clock)
    ctx = Context(torch.device("cpu" if args.dry_run else "cuda"), DRY if args.dry_run else GPU, clock, report,
                  args.out)
    watchdog = threading.Timer(args.budget_s + args.grace_s, report.stop,
                               [f"the watchdog, {args.budget_s + args.grace_s:.0f} s after the start"])
    watchdog.daemon = True
    watchdog.start()
    try:
        report.save()
        for section in SECTIONS:
            if section not in args.sections:
                continue
            clock.enter(section)
            print(f"gpu_suite: {section} at {clock.elapsed():.0f} s, {clock.left():.0f} s to its deadline", flush=True)
            try:
                SECTION_RUNS[section](ctx)
            except Exception as err:  # one section's failure leaves the others to run
                report.note(f"section {section} failed: {one_line(err)}")
        report.set(finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    finally:
        watchdog.cancel()
    print(table(report.data), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

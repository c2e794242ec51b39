"""The pipeline's stages in order: the one table that the config, `sar run`, `sar submit` and the
run report read, and the typed options a stage's `main` takes.

Each stage module (`jobs/<stage>.py`) has `status(cfg)` (is its output up to date, and why) and
`main(cfg, options, tracker)`; its output folder is `cfg.output_of(name)`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Stage:
    """One stage: its command, its config section, its default folder and its entry module."""

    name: str     # the `sar` command, and the key of the stage in `sar run --from/--only`
    section: str  # the config section it reads; that section's `output` overrides `folder`
    folder: str   # its output's default folder under run_dir
    module: str   # its entry point
    summary: str  # one line of `sar --help`


STAGES = (
    Stage("encode", "encode", "latents", "jobs.encode", "images to Parquet latents (Ray Data)"),
    Stage("pretrain", "pretrain", "pretrain", "jobs.pretrain", "self-token pretraining (Ray Train)"),
    Stage("refine", "refine", "refine", "jobs.refine", "self-autoregressive refinement (Ray Train)"),
    Stage("sample", "sample", "samples", "jobs.sample", "generate the evaluation samples (Ray Data actor pool)"),
    Stage("fid", "fid", "eval", "jobs.fid", "FID / IS / precision / recall with torch-fidelity"),
)
NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}


def entry(name: str) -> ModuleType:
    """The entry module of stage `name` (imported on use: a stage loads torch, parsing a command line must not)."""
    return importlib.import_module(BY_NAME[name].module)


@dataclass(frozen=True)
class StageOptions:
    """What a command line adds to the config for one stage."""

    force: bool = False    # encode: re-encode everything from scratch
    preview: bool = False  # sample: only a quick grid of a few classes, in this process

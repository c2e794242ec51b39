"""The `sar` command line's parser: every subcommand, its options and its help.

Building it reads the stage modules' docstrings without importing them, so `sar --help` and a
command line's parse stay cheap (no torch, no Ray). `jobs/cli.py` runs what it parses;
`jobs/submit.py` parses a command here before it sends it to a cluster.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
from pathlib import Path

from jobs.stages import NAMES, STAGES

DESCRIPTION = "`sar`: the one command line of the pipeline."
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
EXIT_CODES = """exit status:
  0   success
  1   a stage failed; one line on stderr says why (a missing input, a storage error, Ray
      did not start, ...)
  2   a bad config, override or argument; one line names the field and the value
  75  try again later (EX_TEMPFAIL): another live process is writing the same output (the
      line names it), the object store or the Ray cluster did not answer
  130 stopped by SIGINT (Ctrl-C), 143 stopped by SIGTERM (128 + the signal): the stage
      stopped at a safe point, kept what it committed (training: a checkpoint), and the same
      command resumes; a second signal stops at once"""
EX_TEMPFAIL = 75


def _doc(module: str) -> str:
    """A module's docstring, read without importing it (building the parser stays cheap)."""
    spec = importlib.util.find_spec(module)
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""


def _command(sub, name: str, summary: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose --help shows its purpose and the exit codes."""
    return sub.add_parser(name, help=summary, description=description or summary, epilog=EXIT_CODES,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _defaults() -> str:
    """What a command without --config runs, from jobs/config.py's defaults, said where a newcomer looks."""
    from jobs.config import DataConfig, EncodeConfig, ModelConfig

    def default(section, name):  # the field's declared default: no validation, which would import torch
        return section.model_fields[name].default

    return (f"the papers' reference run: ImageNet {default(EncodeConfig, 'image_size')} from "
            f"{default(DataConfig, 'source')}, {default(ModelConfig, 'preset')} on {default(EncodeConfig, 'encoder')} "
            "latents; `sar config show` prints it all")


def _add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help=f"YAML config (default: {default or _defaults()})")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one dotted key, e.g. --set pretrain.steps=100 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sar", description=DESCRIPTION, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for stage in STAGES:
        p = _command(sub, stage.name, stage.summary, _doc(stage.module))
        _add_config_args(p)
        if stage.name == "encode":
            p.add_argument("--force", action="store_true", help="re-encode everything from scratch")
        if stage.name == "sample":
            p.add_argument("--preview", action="store_true", help="only a quick grid of a few classes, in this process")

    p = _command(sub, "run", "every stage in order, skipping those already up to date",
                 _doc("jobs.run"))
    _add_config_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--from", dest="from_stage", choices=NAMES, help="start at this stage")
    g.add_argument("--only", dest="only_stage", choices=NAMES, help="run this stage alone")
    p.add_argument("--force", action="store_true", help="re-run stages even when up to date")

    p = _command(sub, "demo", "synthetic data through the whole pipeline at tiny scale, on local Ray",
                 _doc("jobs.demo"))
    p.add_argument("--run-dir", default="runs/demo", help="where everything goes (default: runs/demo)")
    _add_config_args(p, default=f"configs/{DEMO_CONFIG.name}")

    p = _command(sub, "report", "write the run report (report.html) of a run directory", _doc("jobs.report"))
    _add_config_args(p)

    p = _command(sub, "submit", "run a sar command as a Ray Job on a cluster",
                 _doc("jobs.submit"))
    p.add_argument("--address", required=True, help="the Ray dashboard, e.g. http://HEAD:8265")
    p.add_argument("--follow", action="store_true", help="stream the logs and exit with the job's status")
    p.add_argument("--working-dir", default=".", help="project folder to ship (default: .)")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="set a variable in the job's environment, on every node (the value from this "
                        "environment when none is given); repeatable")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the sar subcommand and its arguments")

    p = _command(sub, "synth-imagenet", "write a procedural ImageNet-layout dataset",
                 "Write a synthetic dataset in the ImageNet layout (train/<wnid>/*.JPEG, a flat val/ with "
                 "LOC_val_solution.csv, LOC_synset_mapping.txt): one shape, colour and texture per class, "
                 "deterministic for a seed.")
    d = argparse.ArgumentDefaultsHelpFormatter  # show the defaults of these options
    p.formatter_class = type("Formatter", (d, argparse.RawDescriptionHelpFormatter), {})
    p.add_argument("out", help="output folder (local)")
    p.add_argument("--classes", type=int, default=10, help="number of classes")
    p.add_argument("--per-class", type=int, default=20, help="training images per class")
    p.add_argument("--val-per-class", type=int, default=2, help="validation images per class")
    p.add_argument("--test-per-class", type=int, default=0, help="test images per class (test/<wnid>/)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    p.add_argument("--quirks", action="store_true",
                   help="add CMYK, grayscale, PNG-as-JPEG, RGBA, palette, truncated and empty files")

    p = _command(sub, "synth-latents", "write a synthetic latents dataset at ImageNet's KL-16 shape, without images",
                 _doc("pipelines.data.synth_latents"))
    p.formatter_class = type("Formatter", (d, argparse.RawDescriptionHelpFormatter), {})
    p.add_argument("out", help="the latents folder to write (local or s3://...)")
    p.add_argument("--rows", type=int, required=True, help="rows (images) to write")
    p.add_argument("--shard-rows", type=int, default=1024, help="rows per shard (encode.shard_rows)")
    p.add_argument("--classes", type=int, default=1000, help="number of classes")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same rows)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="storage dtype (encode.storage_dtype)")
    p.add_argument("--workers", type=int, default=1, help="processes making shards (up to one a core)")
    p.add_argument("--force", action="store_true", help="replace a dataset already in OUT")

    p = _command(sub, "plan", "what a run will read, write and take, printed before anything runs",
                 _doc("jobs.plan"))
    _add_config_args(p)
    p.add_argument("--gpus", type=int, metavar="N", action="append",
                   help="GPUs to project the stages' wall time on (repeatable; default: pretrain.num_workers)")
    p.add_argument("--gpus-per-node", type=int, default=8, metavar="N", help="GPUs per node (the read rate per node)")
    for stage, what in (("encode", "rows (image + flip)"), ("pretrain", "images"), ("refine", "images"),
                        ("sample", "images")):
        p.add_argument(f"--{stage}-rate", type=float, metavar="R",
                       help=f"{what}/s per GPU for {stage} (default: the measured or projected figure `sar plan` names)")

    p = _command(sub, "mnist", "write MNIST's 5,000 digits as an ImageNet-layout folder (train/val/test)",
                 _doc("pipelines.data.mnist"))
    p.formatter_class = type("Formatter", (d, argparse.RawDescriptionHelpFormatter), {})
    p.add_argument("out", help="output folder (local)")
    p.add_argument("--size", type=int, default=32, help="image side: the 28 px digits padded with background")
    p.add_argument("--split", default="400,50,50", help="images per class of train, val and test")
    p.add_argument("--seed", type=int, default=0, help="the shuffle that cuts each class into the splits")

    p = _command(sub, "config", "inspect configuration")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = _command(csub, "show", "print the resolved config as YAML")
    _add_config_args(show)
    return parser

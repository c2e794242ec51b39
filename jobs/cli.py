"""`sar`: the one command line of the pipeline.

    sar synth-imagenet OUT --classes N --per-class M --size S --seed K [--quirks]
    sar config show   --config FILE [--set key=value ...]
    sar encode        --config FILE [--set ...] [--force]
    sar pretrain | refine | fid  --config FILE [--set ...]
    sar sample        --config FILE [--set ...] [--preview]
    sar run           --config FILE [--set ...] [--from STAGE | --only STAGE]
    sar demo          [--run-dir DIR]
    sar submit        --address http://HEAD:8265 [--follow] -- <sar subcommand and arguments>

Each stage lives in `jobs/<stage>.py` as `main(config, args) -> exit code`.
Exit codes: 0 success, 1 a stage failed (with a one-line reason), 2 bad config or arguments.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Callable

from jobs.config import ConfigError, PipelineConfig, dump_yaml, load_config
from pipelines.errors import SarError

STAGES = ("encode", "pretrain", "refine", "sample", "fid")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config (defaults: the papers' reference run)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one dotted key, e.g. --set pretrain.steps=100 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sar", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for stage, text in [
        ("encode", "images to Parquet latents (Ray Data)"),
        ("pretrain", "self-token pretraining (Ray Train)"),
        ("refine", "self-autoregressive refinement (Ray Train)"),
        ("sample", "generate the evaluation samples (Ray Data actor pool)"),
        ("fid", "FID / IS / precision / recall with torch-fidelity"),
    ]:
        p = sub.add_parser(stage, help=text, description=text)
        _add_config_args(p)
        if stage == "encode":
            p.add_argument("--force", action="store_true", help="re-encode everything from scratch")
        if stage == "sample":
            p.add_argument("--preview", action="store_true", help="a quick grid for a few classes")

    p = sub.add_parser("run", help="every stage in order, skipping those already up to date")
    _add_config_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--from", dest="from_stage", choices=STAGES, help="start at this stage")
    g.add_argument("--only", dest="only_stage", choices=STAGES, help="run this stage alone")
    p.add_argument("--force", action="store_true", help="re-run stages even when up to date")

    p = sub.add_parser("demo", help="synthetic data through the whole pipeline at tiny scale, on local Ray")
    p.add_argument("--run-dir", default="runs/demo", help="where everything goes (default: runs/demo)")
    _add_config_args(p)

    p = sub.add_parser("submit", help="run a sar command as a Ray Job on a cluster")
    p.add_argument("--address", required=True, help="the Ray dashboard, e.g. http://HEAD:8265")
    p.add_argument("--follow", action="store_true", help="stream the logs and exit with the job's status")
    p.add_argument("--working-dir", default=".", help="project folder to ship (default: .)")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the sar subcommand and its arguments")

    p = sub.add_parser("synth-imagenet", help="write a procedural ImageNet-layout dataset")
    p.add_argument("out", help="output folder")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--val-per-class", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quirks", action="store_true", help="add CMYK, grayscale, PNG-as-JPEG, truncated, empty files")

    p = sub.add_parser("config", help="inspect configuration")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="print the resolved config as YAML")
    _add_config_args(show)
    return parser


def _stage_entry(name: str) -> Callable[[PipelineConfig, argparse.Namespace], int] | None:
    """`jobs.<name>.main`, or None when that stage is not built."""
    module_name = f"jobs.{name.replace('-', '_')}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return None
        raise
    return module.main


def _synth(args: argparse.Namespace) -> int:
    from pipelines.synth import make_synthetic_imagenet

    try:
        s = make_synthetic_imagenet(
            args.out, classes=args.classes, per_class=args.per_class, size=args.size,
            seed=args.seed, val_per_class=args.val_per_class, quirks=args.quirks,
        )
    except ValueError as err:
        print(f"sar synth-imagenet: {err}", file=sys.stderr)
        return 2
    print(f"wrote {s.train_images} train and {s.val_images} val images of {s.classes} classes to {s.root}"
          + (f" ({len(s.quirks)} quirk files)" if s.quirks else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True,
    )
    command = args.command
    if command == "synth-imagenet":
        return _synth(args)
    if command == "submit":
        entry = _stage_entry("submit")
        if entry is None:
            print("sar submit: not built yet", file=sys.stderr)
            return 3
        return entry(None, args)
    try:
        if command == "demo":
            overrides = [f"run_dir={args.run_dir}", *args.overrides]
            cfg = load_config(args.config or _demo_config_path(), overrides)
        else:
            cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"sar {command}: {err}", file=sys.stderr)
        return 2
    if command == "config":
        sys.stdout.write(dump_yaml(cfg))
        return 0
    entry = _stage_entry(command)
    if entry is None:
        print(f"sar {command}: this stage is not built yet", file=sys.stderr)
        return 3
    try:
        return int(entry(cfg.with_absolute_paths(), args) or 0)
    except ConfigError as err:
        print(f"sar {command}: {err}", file=sys.stderr)
        return 2
    except SarError as err:
        print(f"sar {command}: error: {err}", file=sys.stderr)
        return 1


def _demo_config_path() -> str:
    return str(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")


if __name__ == "__main__":
    sys.exit(main())

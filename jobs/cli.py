"""`sar`: the one command line of the pipeline.

    sar synth-imagenet OUT --classes N --per-class M --size S --seed K [--quirks]
    sar config show   --config FILE [--set key=value ...]
    sar encode        --config FILE [--set ...] [--force]
    sar pretrain | refine | fid  --config FILE [--set ...]
    sar sample        --config FILE [--set ...] [--preview]
    sar run           --config FILE [--set ...] [--from STAGE | --only STAGE]
    sar demo          [--run-dir DIR]
    sar report        --config FILE [--set run_dir=DIR]
    sar submit        --address http://HEAD:8265 [--follow] [--env NAME[=VALUE] ...] -- <sar subcommand and arguments>

Each stage lives in `jobs/<stage>.py` as `main(config, args) -> exit code`. A stage, `run` and
`demo` log into the run directory's MLflow run (jobs/run.py, `tracking` in the config) and end
with a line saying how to look at it.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import logging
import sys
from pathlib import Path

from jobs.config import ConfigError, PipelineConfig, dump_yaml, load_config
from jobs.run import STAGES, TRACKED, lineage_tags, open_tracker, run_stage
from pipelines import tracking
from pipelines.errors import SarError
from pipelines.lease import LeaseHeld, LeaseLost
from pipelines.storage import StorageError

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
EXIT_CODES = """exit status:
  0   success
  1   a stage failed; one line on stderr says why (a missing input, a storage error, Ray
      did not start, ...)
  2   a bad config, override or argument; one line names the field and the value
  75  try again later (EX_TEMPFAIL): another live process is writing the same output (the
      line names it), or the object store did not answer or kept throttling"""
EX_TEMPFAIL = 75


def _doc(module: str) -> str:
    """A jobs module's docstring, read without importing it (building the parser stays cheap)."""
    spec = importlib.util.find_spec(f"jobs.{module}")
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""


def _command(sub, name: str, summary: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose --help shows its purpose and the exit codes."""
    return sub.add_parser(name, help=summary, description=description or summary, epilog=EXIT_CODES,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_config_args(p: argparse.ArgumentParser, default: str = "the papers' reference run") -> None:
    p.add_argument("--config", "-c", metavar="FILE", help=f"YAML config (default: {default})")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one dotted key, e.g. --set pretrain.steps=100 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sar", description=__doc__.split("\n\n")[0], epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for stage, text in [
        ("encode", "images to Parquet latents (Ray Data)"),
        ("pretrain", "self-token pretraining (Ray Train)"),
        ("refine", "self-autoregressive refinement (Ray Train)"),
        ("sample", "generate the evaluation samples (Ray Data actor pool)"),
        ("fid", "FID / IS / precision / recall with torch-fidelity"),
    ]:
        p = _command(sub, stage, text, _doc(stage))
        _add_config_args(p)
        if stage == "encode":
            p.add_argument("--force", action="store_true", help="re-encode everything from scratch")
        if stage == "sample":
            p.add_argument("--preview", action="store_true", help="only a quick grid of a few classes, in this process")

    p = _command(sub, "run", "every stage in order, skipping those already up to date",
                 _doc("run"))
    _add_config_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--from", dest="from_stage", choices=STAGES, help="start at this stage")
    g.add_argument("--only", dest="only_stage", choices=STAGES, help="run this stage alone")
    p.add_argument("--force", action="store_true", help="re-run stages even when up to date")

    p = _command(sub, "demo", "synthetic data through the whole pipeline at tiny scale, on local Ray",
                 _doc("demo"))
    p.add_argument("--run-dir", default="runs/demo", help="where everything goes (default: runs/demo)")
    _add_config_args(p, default=f"configs/{DEMO_CONFIG.name}")

    p = _command(sub, "report", "write the run report (report.html) of a run directory", _doc("report"))
    _add_config_args(p)

    p = _command(sub, "submit", "run a sar command as a Ray Job on a cluster",
                 _doc("submit"))
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
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    p.add_argument("--quirks", action="store_true",
                   help="add CMYK, grayscale, PNG-as-JPEG, RGBA, palette, truncated and empty files")

    p = _command(sub, "config", "inspect configuration")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = _command(csub, "show", "print the resolved config as YAML")
    _add_config_args(show)
    return parser


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
    if not args.verbose:  # the object-store clients' INFO lines (endpoint discovery, ...) say nothing to a user
        for name in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)
    command = args.command
    if command == "synth-imagenet":
        return _synth(args)
    if command == "submit":
        from jobs import submit

        return submit.main(None, args)
    try:
        if command == "demo":
            cfg = load_config(args.config or DEMO_CONFIG, [f"run_dir={args.run_dir}", *args.overrides])
        else:
            cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"sar {command}: {err}", file=sys.stderr)
        return 2
    if command == "config":
        sys.stdout.write(dump_yaml(cfg))
        return 0
    cfg = cfg.with_absolute_paths()
    module = importlib.import_module(f"jobs.{command}")
    tracker = open_tracker(cfg, command) if command in TRACKED else tracking.NULL
    args.tracker, status = tracker, "FAILED"
    try:
        if command in STAGES:  # a stage alone: nested in the command's run, as `sar run` does
            rc = run_stage(cfg, command, module, args, tracker)
        else:
            rc = int(module.main(cfg, args) or 0)
        if rc == 0:
            status = "FINISHED"
            if tracker.enabled:
                tracker.set_tags(lineage_tags(cfg))
        return rc
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as err:
        failure = _user_error(err)
        if failure is None:
            raise
        code, message = _exit_status(failure, cfg)
        print(f"sar {command}: {message}", file=sys.stderr)
        return code
    finally:
        if command in TRACKED:
            tracker.close(status)
            if tracker.enabled:  # where to look at the runs; nothing to say when tracking is off or failed
                print(tracker.hint(), flush=True)


def _user_error(err: BaseException) -> BaseException | None:
    """The error to show the user: a config, stage or storage error, found inside whatever wrapped it
    (a Ray task's RayTaskError keeps it as `cause`; Ray Data chains it as __cause__)."""
    queue, seen = [err], set()
    while queue:
        e = queue.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):  # the task's own exception, not Ray's traceback-laden copy
            queue.insert(0, cause)
            continue
        if isinstance(e, (ConfigError, SarError, StorageError)):
            return e
        queue += [e.__cause__, e.__context__]
    return None


def _exit_status(err: BaseException, cfg: PipelineConfig) -> tuple[int, str]:
    """(exit status, one line) for a user-facing error."""
    text = " ".join(str(err).split())
    if isinstance(err, ConfigError):
        return 2, text
    if isinstance(err, StorageError) and err.field is None:
        field = cfg.field_of(err.url) if err.url else None
        text = f"{field} {text}" if field else text
    temporary = isinstance(err, (LeaseHeld, LeaseLost)) or (isinstance(err, StorageError) and err.transient)
    return (EX_TEMPFAIL if temporary else 1), f"error: {text}"


if __name__ == "__main__":
    sys.exit(main())

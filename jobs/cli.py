"""`sar`: the one command line of the pipeline.

    sar synth-imagenet OUT --classes N --per-class M --size S --seed K [--quirks]
    sar synth-latents OUT --rows N [--shard-rows R] [--classes C] [--seed K] [--dtype D] [--workers W] [--force]
    sar plan          --config FILE [--set ...] [--gpus N ...] [--gpus-per-node G] [--<stage>-rate R]
    sar mnist         OUT [--size 32] [--split 400,50,50] [--seed 0]
    sar config show   --config FILE [--set key=value ...]
    sar encode        --config FILE [--set ...] [--force]
    sar pretrain | refine | fid  --config FILE [--set ...]
    sar sample        --config FILE [--set ...] [--preview]
    sar run           --config FILE [--set ...] [--from STAGE | --only STAGE]
    sar demo          [--run-dir DIR]
    sar report        --config FILE [--set run_dir=DIR]
    sar submit        --address http://HEAD:8265 [--follow] [--env NAME[=VALUE] ...] -- <sar subcommand and arguments>

Each stage lives in `jobs/<stage>.py` as `main(config, options, tracker) -> exit code` (the table
of stages is jobs/stages.py, the parser jobs/parser.py). A stage, `run` and `demo` log into the run
directory's MLflow run (jobs/run.py, `tracking` in the config) and end with a line saying how to
look at it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from jobs.config import ConfigError, PipelineConfig, dump_yaml, load_config
from jobs.parser import DEMO_CONFIG, EX_TEMPFAIL, build_parser
from jobs.run import TRACKED, lineage_tags, open_tracker, run_pipeline, run_stage
from jobs.stages import NAMES, StageOptions, entry
from pipelines.core import stop, tracking
from pipelines.core.errors import SarError, causes, describe, root_cause
from pipelines.core.lease import LeaseHeld, LeaseLost
from pipelines.core.ray_runtime import shutdown_ray
from pipelines.core.storage import StorageError

log = logging.getLogger("sar")


def _synth(args: argparse.Namespace) -> int:
    from pipelines.data.synth import make_synthetic_imagenet

    try:
        s = make_synthetic_imagenet(
            args.out, classes=args.classes, per_class=args.per_class, size=args.size,
            seed=args.seed, val_per_class=args.val_per_class, quirks=args.quirks, test_per_class=args.test_per_class,
        )
    except ValueError as err:
        print(f"sar synth-imagenet: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {s.train_images} train, {s.val_images} val and {s.test_images} test images of {s.classes} classes "
          f"to {s.root}"
          + (f" ({len(s.quirks)} quirk files)" if s.quirks else ""))
    return 0


def _synth_latents(args: argparse.Namespace) -> int:
    from pipelines.data.synth_latents import make_synthetic_latents

    try:
        summary = make_synthetic_latents(args.out, args.rows, shard_rows=args.shard_rows, classes=args.classes,
                                         seed=args.seed, dtype=args.dtype, force=args.force, workers=args.workers)
    except ValueError as err:
        print(f"sar synth-latents: error: {err}", file=sys.stderr)
        return 2
    except (SarError, StorageError) as err:
        code = EX_TEMPFAIL if getattr(err, "transient", False) else 1
        print(f"sar synth-latents: error: {' '.join(str(err).split())}", file=sys.stderr)
        return code
    print(summary.line())
    return 0


def _mnist(args: argparse.Namespace) -> int:
    from pipelines.data.mnist import write_mnist

    try:
        split = tuple(int(n) for n in args.split.split(","))
        s = write_mnist(args.out, size=args.size, split=split, seed=args.seed)
    except ValueError:
        print(f"sar mnist: error: --split {args.split!r}: three whole numbers, e.g. 400,50,50", file=sys.stderr)
        return 2
    except SarError as err:
        print(f"sar mnist: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(f'{n} {split}' for split, n in s.counts.items())} images of 10 digits to {s.root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one `sar` command line; its exit status (README, "Exit status")."""
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
    if command == "synth-latents":
        return _synth_latents(args)
    if command == "mnist":
        return _mnist(args)
    if command == "submit":
        from jobs import submit

        return submit.main(args)
    try:
        if command == "demo":
            cfg = load_config(args.config or DEMO_CONFIG, [f"run_dir={args.run_dir}", *args.overrides])
        else:
            cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"sar {command}: error: {err}", file=sys.stderr)
        return 2
    if command == "config":
        sys.stdout.write(dump_yaml(cfg))
        return 0
    cfg = cfg.with_absolute_paths()
    # SIGTERM and SIGINT stop a stage at its next safe point (pipelines/core/stop.py).
    with stop.handling() if command in TRACKED else contextlib.nullcontext():
        try:
            return _run_tracked(cfg, args)
        except stop.Stopped as err:  # a second signal during the first one's clean-up
            print(f"sar {command}: {err}", file=sys.stderr, flush=True)
            return err.exit_status


def console() -> None:
    """The `sar` program: main's exit status; after a second stop signal at once, without waiting for
    Ray, the tracker or the interpreter to wind down (the lease is already released)."""
    code = main()
    if stop.forced():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _run_tracked(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """A config command inside the run directory's tracking; every failure ends as one line."""
    command = args.command
    tracker, status, line = tracking.NULL, "FAILED", None
    try:
        if command in TRACKED:
            tracker = open_tracker(cfg, command)
        code = _run_command(cfg, args, tracker)
        if code == 0:
            status = "FINISHED"
            if tracker.enabled:
                tracker.set_tags(lineage_tags(cfg))
    except stop.Stopped as err:
        status, code, line = "KILLED", err.exit_status, f"sar {command}: {err}"
        if err.at_once:  # no clean-up: console() exits now
            print(line, file=sys.stderr, flush=True)
            return code
    except KeyboardInterrupt:  # a command without stop handling (report)
        status = "KILLED"
        raise
    except Exception as err:  # noqa: BLE001 - any failure is one line; -v shows the trace
        log.debug("sar %s failed", command, exc_info=err)
        code, line = _failure(err, cfg, command, args.verbose)
    if line:
        print(line, file=sys.stderr, flush=True)
    if command in TRACKED:
        try:
            tracker.close(status)
        except Exception as err:  # noqa: BLE001 - a clean-up failure never hides the command's own result
            log.warning("tracking could not be closed: %s", " ".join(str(err).split()))
        if tracker.enabled:  # where to look at the runs; nothing to say when tracking is off or failed
            print(tracker.hint(), flush=True)
    if status == "KILLED":
        shutdown_ray()  # the Train workers and actors this driver started end now
    return code


def _run_command(cfg: PipelineConfig, args: argparse.Namespace, tracker: tracking.Tracker) -> int:
    """Run a command that takes a config; its exit code."""
    command = args.command
    if command in NAMES:  # a stage alone: nested in the command's run, as `sar run` does
        options = StageOptions(force=getattr(args, "force", False), preview=getattr(args, "preview", False))
        return run_stage(cfg, command, entry(command), options, tracker)
    if command == "run":
        return run_pipeline(cfg, start=args.from_stage, only=args.only_stage, force=args.force, tracker=tracker)
    if command == "demo":
        from jobs import demo

        return demo.main(cfg, tracker)
    if command == "report":
        from jobs import report

        return report.main(cfg, tracker)
    if command == "plan":
        from jobs import plan

        return plan.main(cfg, args)
    raise AssertionError(f"no handler for the command {command!r}")


def _user_error(err: BaseException) -> BaseException | None:
    """The error to show the user: a config, stage or storage error, found inside whatever wrapped it
    (a Ray task's RayTaskError, Ray Data's UserCodeException, Ray Train's worker failures)."""
    return next((e for e in causes(err) if isinstance(e, (ConfigError, SarError, StorageError))), None)


def _failure(err: BaseException, cfg: PipelineConfig, command: str, verbose: bool) -> tuple[int, str]:
    """(exit status, the one line) of a failed command: a known error as it says, anything else by
    its cause inside Ray's wrappers (a full disk, a permission, out of memory, ...), the file it
    names prefixed with the config field it comes from."""
    known = _user_error(err)
    if known is not None:
        code, message = _exit_status(known, cfg)
        return code, f"sar {command}: {message}"
    cause = root_cause(err)
    text = describe(cause)
    path = getattr(cause, "filename", None)
    field = cfg.field_of(str(path)) if path else None
    if not isinstance(cause, (OSError, MemoryError)) and type(cause).__name__ != "OutOfMemoryError" and not verbose:
        text += " (`sar -v` shows the full trace)"
    return 1, f"sar {command}: error: {field + ' ' if field else ''}{text}"


def _exit_status(err: BaseException, cfg: PipelineConfig) -> tuple[int, str]:
    """(exit status, one line) for a user-facing error."""
    text = " ".join(str(err).split())
    if isinstance(err, ConfigError):
        return 2, text
    if isinstance(err, StorageError) and err.field is None:
        field = cfg.field_of(err.url) if err.url else None
        text = f"{field} {text}" if field else text
    temporary = isinstance(err, (LeaseHeld, LeaseLost)) or getattr(err, "transient", False)
    return (EX_TEMPFAIL if temporary else 1), f"error: {text}"


if __name__ == "__main__":
    console()

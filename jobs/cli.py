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
import logging
import sys

from jobs.config import ConfigError, PipelineConfig, dump_yaml, load_config
from jobs.parser import DEMO_CONFIG, EX_TEMPFAIL, build_parser
from jobs.run import TRACKED, lineage_tags, open_tracker, run_pipeline, run_stage
from jobs.stages import NAMES, StageOptions, entry
from pipelines.core import tracking
from pipelines.core.errors import SarError
from pipelines.core.lease import LeaseHeld, LeaseLost
from pipelines.core.storage import StorageError


def _synth(args: argparse.Namespace) -> int:
    from pipelines.data.synth import make_synthetic_imagenet

    try:
        s = make_synthetic_imagenet(
            args.out, classes=args.classes, per_class=args.per_class, size=args.size,
            seed=args.seed, val_per_class=args.val_per_class, quirks=args.quirks, test_per_class=args.test_per_class,
        )
    except ValueError as err:
        print(f"sar synth-imagenet: {err}", file=sys.stderr)
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
        print(f"sar {command}: {err}", file=sys.stderr)
        return 2
    if command == "config":
        sys.stdout.write(dump_yaml(cfg))
        return 0
    cfg = cfg.with_absolute_paths()
    tracker = open_tracker(cfg, command) if command in TRACKED else tracking.NULL
    status = "FAILED"
    try:
        rc = _run_command(cfg, args, tracker)
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

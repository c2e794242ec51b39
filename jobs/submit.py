"""`sar submit`: run one `sar` command on a Ray cluster as a Ray Job.

    sar submit --address http://HEAD:8265 [--follow] [--working-dir DIR] [--env NAME[=VALUE] ...] -- pretrain ...

Reads: the project folder (`--working-dir`, default `.`), which is uploaded to the cluster as
the job's `working_dir`: the code travels with every submission, so editing a stage needs no
new image. Writes: nothing locally; the job writes where its config says (`run_dir`, usually
an `s3://` URL).

The job's entrypoint is `python -m jobs.cli <command>` run on the head node inside the
uploaded folder, so `sar` need not be on the cluster's PATH and the uploaded code shadows
any copy installed in the image. The Python packages come from the cluster's image (built
from `infra/Dockerfile` with `uv sync --locked`), not from the runtime environment: resolving
torch and CUDA wheels per job is slow and can drift from `uv.lock`. See docs/cluster.md.
`--env` adds variables to the job's runtime environment, so the driver and every task and
actor it starts, on every node, see them (an object-store endpoint, a setting); the values
are visible in the job's record on the dashboard, so credentials belong to the cluster.

Without `--follow` it prints the job id and returns at once. With `--follow` it streams the
job's logs and ends with the job's final status; the exit code is 0 only for SUCCEEDED.
Exit codes: 0 submitted (or SUCCEEDED), 1 a job that did not succeed or a cluster that refused
it, 2 no command or not a valid `sar` command line, 75 a dashboard that does not answer (try
again), 130 stopped following (the job runs on). Errors are one line, `sar submit: error: ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from jobs.parser import EX_TEMPFAIL, build_parser
from jobs.stages import BY_NAME, NAMES

# What never goes to the cluster: environments, outputs, data (the tests' recorded run folders
# too), caches and history. Ray reads these as .gitignore patterns relative to the working_dir
# (and also honours .gitignore).
WORKING_DIR_EXCLUDES = [
    "/.venv/",
    "/runs/",
    "/data/",
    "/tests/data/",
    "/scratch/",
    ".git/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    "*.egg-info/",
]

# Environment variables that would silently override --address inside JobSubmissionClient.
_ADDRESS_VARIABLES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def job_argv(argv: list[str]) -> list[str]:
    """The `sar` command line to run: `argv` without its leading `--`; checked to parse.

    Raises ValueError (exit 2) for an empty command, a nested `submit` or a command line that
    `sar` itself would reject, so a typo fails here and not minutes later on the cluster.
    """
    command = list(argv[1:] if argv[:1] == ["--"] else argv)
    if not command:
        raise ValueError("no command to run; give one after --, "
                         "e.g. `sar submit --address URL -- pretrain --config FILE`")
    if command[0] == "submit":
        raise ValueError("a submitted job cannot itself submit; give the stage to run after --")
    try:
        build_parser().parse_args(command)
    except SystemExit as exc:  # argparse has printed the reason
        raise ValueError(f"not a valid sar command line: {shlex.join(command)}") from exc
    return command


def entrypoint(command: list[str]) -> str:
    """The shell command the job runs on the head node."""
    return f"python -m jobs.cli {shlex.join(command)}"


def env_vars(assignments: list[str]) -> dict[str, str]:
    """`--env NAME=VALUE` as given, `--env NAME` with this environment's value; ValueError when unset."""
    out = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not name:
            raise ValueError(f"--env {item!r}: expected NAME or NAME=VALUE")
        if not sep:
            if name not in os.environ:
                raise ValueError(f"--env {name}: not set in this environment; give NAME=VALUE")
            value = os.environ[name]
        out[name] = value
    return out


def runtime_env(working_dir: str | Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The job's runtime environment: the project folder as working_dir, minus the excludes, and
    `env` as environment variables of the driver and of every task and actor it starts."""
    root = Path(working_dir).resolve()
    if not (root / "jobs" / "cli.py").is_file():
        raise ValueError(f"--working-dir {working_dir}: not the project folder (no jobs/cli.py in {root})")
    return {"working_dir": str(root), "excludes": list(WORKING_DIR_EXCLUDES), **({"env_vars": env} if env else {})}


def local_outputs(command: list[str], working_dir: str | Path) -> list[str]:
    """The outputs of a stage command that would land on a node's local disk, not a shared store.

    On a cluster a relative path resolves inside the job's temporary copy of the project on
    whichever node writes it, so results would be scattered and lost. A config that does not
    load here yields nothing: the job itself reports it.
    """
    from jobs.config import ConfigError, load_config

    if command[0] not in (*NAMES, "run", "report"):
        return []
    args = build_parser().parse_args(command)
    config = args.config
    if config and not Path(config).is_absolute():
        config = str(Path(working_dir) / config)
    try:
        cfg = load_config(config, args.overrides)
    except ConfigError:
        return []
    outputs = {"run_dir": cfg.run_dir, **{BY_NAME[name].folder: url for name, url in cfg.outputs().items()}}
    return [f"{name}={path}" for name, path in outputs.items() if "://" not in path]


def submission_id(command: list[str]) -> str:
    """A readable, unique id: `sar-pretrain-20250101-120000-1a2b3c`."""
    return f"sar-{command[0]}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def _address_from_argument() -> Iterator[None]:
    """Hide RAY_ADDRESS / RAY_API_SERVER_ADDRESS, which the Ray client prefers to its argument."""
    saved = {k: os.environ.pop(k) for k in _ADDRESS_VARIABLES if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def connect(address: str):
    """A JobSubmissionClient for the dashboard at `address`.

    Raises ConnectionError when nothing answers there, PermissionError when the cluster wants
    a token this client does not have (Ray's token authentication).
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    with _address_from_argument():
        try:
            return JobSubmissionClient(address)
        except AuthenticationError as exc:
            raise PermissionError(_first_line(exc)) from exc
        except ConnectionError:
            raise
        except Exception as exc:  # a malformed URL, an HTTP error from something that is not Ray
            raise ConnectionError(_first_line(exc)) from exc


def submit_job(client, agent_wait_s: float = 60.0, **job: Any) -> str:
    """`client.submit_job(**job)`, waiting out a head that has just started.

    Until its dashboard agent registers, a new head answers 500 "No available agent" (KubeRay's
    submitter retries the same way); any other refusal is raised at once.
    """
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


async def _stream_logs(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def wait_for_end(client, job_id: str, poll_s: float = 0.5) -> str:
    """Block until the job reaches SUCCEEDED, FAILED or STOPPED; returns that status."""
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def follow(client, job_id: str) -> str:
    """Stream the job's logs to stdout until it ends; returns its final status."""
    asyncio.run(_stream_logs(client, job_id))
    # The log stream closes when the driver exits; the status may lag it by a moment.
    return wait_for_end(client, job_id)


def main(args: argparse.Namespace) -> int:
    """Submit `args.argv` as a Ray Job to `args.address`; optionally follow it to the end."""
    try:
        command = job_argv(args.argv)
        env = runtime_env(args.working_dir, env_vars(getattr(args, "env", [])))
    except ValueError as err:
        print(f"sar submit: error: {err}", file=sys.stderr)
        return 2

    local = local_outputs(command, args.working_dir)
    if local:
        print(f"sar submit: warning: local output paths ({', '.join(local)}) stay on the node that writes them; "
              "on a cluster use an object-store URL, e.g. --set run_dir=s3://bucket/run", file=sys.stderr)

    try:
        client = connect(args.address)
    except ConnectionError as err:  # a head that is down or starting: try again later
        print(f"sar submit: error: cannot reach the Ray dashboard at {args.address} ({err})", file=sys.stderr)
        return EX_TEMPFAIL
    except PermissionError:
        print(f"sar submit: error: the Ray cluster at {args.address} requires a token: set RAY_AUTH_MODE=token "
              "and RAY_AUTH_TOKEN (or ~/.ray/auth_token); see docs/cluster.md", file=sys.stderr)
        return 1

    try:
        job_id = submit_job(
            client,
            entrypoint=entrypoint(command),
            submission_id=submission_id(command),
            runtime_env=env,
            metadata={"sar_command": shlex.join(command)},
        )
    except (RuntimeError, ConnectionError) as err:  # upload refused, job server error
        print(f"sar submit: error: the cluster at {args.address} refused the job ({_first_line(err)})",
              file=sys.stderr)
        return 1
    print(job_id, flush=True)
    stop_hint = f"ray job stop --address {args.address} {job_id}"
    if not args.follow:
        print(f"sar submit: follow with `ray job logs --address {args.address} --follow {job_id}`; "
              f"stop with `{stop_hint}`", file=sys.stderr)
        return 0

    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nsar submit: stopped following; job {job_id} keeps running (`{stop_hint}` stops it)",
              file=sys.stderr)
        return 130
    print(f"job {job_id} {status}", flush=True)
    if status != "SUCCEEDED":
        message = (client.get_job_info(job_id).message or "").strip().splitlines()
        if message:
            print(f"sar submit: error: {message[0]}", file=sys.stderr)
        return 1
    return 0

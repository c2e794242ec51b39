"""`sar submit` against a real Ray head on loopback (its own processes and temp dir).

The head is started with `ray start --head --block` from this environment and stopped by
signalling that process and its process group, never with `ray stop`, which would end every
Ray instance on the machine (the session's `ray_local` included).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from jobs import submit
from jobs.cli import main
from jobs.parser import EX_TEMPFAIL
from tests.conftest import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def _wait_for_dashboard(url: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        with contextlib.suppress(OSError):  # not listening yet
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(0.5)
    raise TimeoutError(f"no Ray dashboard at {url} after {timeout_s:.0f} s")


@pytest.fixture(scope="module")
def ray_head():
    """A one-CPU Ray head with a dashboard on free loopback ports; yields its http:// URL."""
    temp_dir = tempfile.mkdtemp(prefix="sar-ray-", dir="/tmp")  # short: Ray's socket paths are limited
    dash_port = free_port()
    bin_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # The job's `python` must be this environment's, as it is the image's on a real cluster.
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    # Ray 2.60 turns token authentication on whenever ~/.ray/auth_token exists (a local
    # ray.init() writes one); this loopback head is the test's alone, so keep it off.
    env["RAY_AUTH_MODE"] = "disabled"
    cmd = [
        os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--disable-usage-stats",
        f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
        "--num-cpus=1", "--num-gpus=0", f"--object-store-memory={100 * 1024 * 1024}",
    ]
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash_port}"
    try:
        _wait_for_dashboard(url, proc)
        yield url
    finally:
        # SIGTERM lets `ray start --block` shut its node down; then clear its process group.
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):  # then the SIGKILL below
                proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(proc.pid, signal.SIGKILL)  # the group this fixture created
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_argv_strips_separator_and_checks_the_command():
    assert submit.job_argv(["--", "pretrain", "--config", "c.yaml"]) == ["pretrain", "--config", "c.yaml"]
    assert submit.job_argv(["fid"]) == ["fid"]
    with pytest.raises(ValueError, match="no command"):
        submit.job_argv(["--"])
    with pytest.raises(ValueError, match="cannot itself submit"):
        submit.job_argv(["--", "submit", "--address", "x", "--", "fid"])
    with pytest.raises(ValueError, match="not a valid sar command"):
        submit.job_argv(["--", "pretrian"])


def test_entrypoint_quotes_arguments():
    cmd = ["run", "--config", "configs/demo.yaml", "--set", "run_dir=s3://b/my run"]
    assert submit.entrypoint(cmd) == "python -m jobs.cli run --config configs/demo.yaml --set 'run_dir=s3://b/my run'"


def test_runtime_env_ships_the_project_without_heavy_folders(tmp_path):
    env = submit.runtime_env(REPO)
    assert env["working_dir"] == REPO
    for pattern in ("/.venv/", "/runs/", "/data/", ".git/", "__pycache__/"):
        assert pattern in env["excludes"]
    with pytest.raises(ValueError, match="not the project folder"):
        submit.runtime_env(tmp_path)


def test_env_goes_into_the_runtime_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://store:9000")
    monkeypatch.delenv("SAR_NOT_SET", raising=False)
    env = submit.env_vars(["AWS_ENDPOINT_URL_S3", "SAR_FAIL_AT_STEP=20", "EMPTY="])
    assert env == {"AWS_ENDPOINT_URL_S3": "http://store:9000", "SAR_FAIL_AT_STEP": "20", "EMPTY": ""}
    assert submit.runtime_env(REPO, env)["env_vars"] == env
    assert "env_vars" not in submit.runtime_env(REPO)  # nothing asked, nothing set
    with pytest.raises(ValueError, match="SAR_NOT_SET: not set in this environment"):
        submit.env_vars(["SAR_NOT_SET"])
    assert main(["submit", "--address", "http://127.0.0.1:9", "--env", "SAR_NOT_SET", "--", "config", "show"]) == 2


def test_empty_command_exits_2(capsys):
    assert main(["submit", "--address", "http://127.0.0.1:9", "--"]) == 2
    assert capsys.readouterr().err.startswith("sar submit: error: no command to run")


def test_unreachable_address_is_try_again_later(capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # must not override --address
    port = free_port()  # bound and released: nothing listens there
    assert main(["submit", "--address", f"http://127.0.0.1:{port}", "--", "config", "show"]) == EX_TEMPFAIL
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sar submit: error: cannot reach the Ray dashboard at http://127.0.0.1:{port}")
    assert len(err.splitlines()) == 1


@pytest.mark.ray
def test_submit_follow_succeeds_and_streams_the_log(ray_head, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the default --working-dir is "."
    code = main(["submit", "--address", ray_head, "--follow", "--", "config", "show", "--set", "pretrain.steps=3"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err + out
    job_id = out.splitlines()[0]
    assert job_id.startswith("sar-config-")
    assert re.search(r"^  steps: 3$", out, re.M)  # the job's own output: pretrain.steps resolved to 3
    assert out.rstrip().endswith(f"job {job_id} SUCCEEDED")


@pytest.mark.ray
def test_submit_follow_reports_a_failing_job(ray_head, capsys):
    code = main(["submit", "--address", ray_head, "--follow", "--working-dir", REPO,
                 "--", "config", "show", "--set", "nosuch=1"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.rstrip().endswith("FAILED")
    assert "unknown config key 'nosuch'" in captured.out  # the job's stderr, streamed


@pytest.mark.ray
def test_submit_without_follow_prints_the_id_and_returns(ray_head, capsys):
    from ray.job_submission import JobSubmissionClient

    code = main(["submit", "--address", ray_head, "--working-dir", REPO, "--", "config", "show"])
    captured = capsys.readouterr()
    assert code == 0
    job_id = captured.out.strip()
    assert "ray job logs" in captured.err
    info = JobSubmissionClient(ray_head).get_job_info(job_id)  # the head knows it; it runs on alone
    assert info.entrypoint == "python -m jobs.cli config show"
    assert info.metadata["sar_command"] == "config show"


def test_local_outputs_are_named_for_stage_commands():
    local = submit.local_outputs(["pretrain", "--config", "configs/demo.yaml"], REPO)
    assert "run_dir=runs/demo" in local and "samples=runs/demo/samples" in local
    on_store = ["run", "--config", "configs/demo.yaml", "--set", "run_dir=s3://bucket/demo"]
    assert submit.local_outputs(on_store, REPO) == []
    assert submit.local_outputs(["config", "show"], REPO) == []  # writes nothing
    assert submit.local_outputs(["fid", "--set", "nosuch=1"], REPO) == []  # the job reports that


class _FlakyHead:
    """A job server that answers like a head whose dashboard agent is not up yet, then accepts."""

    def __init__(self, refusals: int, message: str):
        self.refusals, self.message, self.calls = refusals, message, 0

    def submit_job(self, **job):
        self.calls += 1
        if self.calls <= self.refusals:
            raise RuntimeError(f"Request failed with status code 500: {self.message}.")
        return job["submission_id"]


def test_submit_job_waits_for_the_agent_of_a_new_head(monkeypatch):
    monkeypatch.setattr(submit.time, "sleep", lambda s: None)
    head = _FlakyHead(2, "No available agent to submit job, please try again later.")
    assert submit.submit_job(head, submission_id="sar-x", entrypoint="e") == "sar-x"
    assert head.calls == 3
    other = _FlakyHead(1, "Job with submission_id sar-x already exists")
    with pytest.raises(RuntimeError, match="already exists"):
        submit.submit_job(other, submission_id="sar-x", entrypoint="e")
    assert other.calls == 1

"""pipelines/core/tracking.py against a real MLflow server on loopback, the embedded store and moto's S3."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import pytest

from pipelines.core import storage, tracking
from tests.conftest import free_port

MLFLOW = os.path.join(os.path.dirname(sys.executable), "mlflow")



@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port with its own SQLite store and artifact root."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    # No job-runner process beside the server: it starts faster on a busy machine.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    for k in [k for k in env if k.startswith("AWS_")]:  # artifacts stay on local disk
        env.pop(k)
    logf = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=root, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: the group this fixture made
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        logf.close()


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sar.tracking" and r.levelno >= logging.WARNING]


# Pure helpers -----------------------------------------------------------------------------------
def test_flatten_params_dotted_strings_and_limit():
    params = tracking.flatten_params({"model": {"preset": "sar-b", "scales": [1, 2, 4], "overrides": {}},
                                      "pretrain": {"optim": {"lr": 8e-4, "betas": (0.9, 0.95)}},
                                      "data": {"storage_options": {"key": "<redacted>"}}, "long": "x" * 900,
                                      "odd key!": None})
    assert params["model.preset"] == "sar-b"
    assert params["model.scales"] == "[1, 2, 4]"
    assert params["model.overrides"] == "{}"
    assert params["pretrain.optim.lr"] == "0.0008"
    assert params["pretrain.optim.betas"] == "[0.9, 0.95]"
    assert params["data.storage_options.key"] == "<redacted>"
    assert params["odd key_"] == "None"
    assert len(params["long"]) == tracking.PARAM_MAX_CHARS and params["long"].endswith("(+400 chars)")


def test_metric_items_keeps_numbers_only():
    items = tracking.metric_items({"fid": 3.5, "inception_score": {"mean": 100.0, "std": 2}, "grid": "a.png",
                                   "precision": None, "ok": True}, prefix="final/")
    assert items == {"final/fid": 3.5, "final/inception_score.mean": 100.0, "final/inception_score.std": 2.0}


def test_none_backend_is_a_no_op(tmp_path):
    tr = tracking.open_run(str(tmp_path), backend="none")
    assert tr is tracking.NULL and not tr.enabled
    with tr, tr.stage("pretrain", str(tmp_path / "pretrain")) as st:
        st.log_metrics({"step": 1, "loss": 1.0})
        st.log_artifact(b"x", name="a.txt")
        assert st.handoff() is None
    assert tr.hint() == "tracking: off"
    assert os.listdir(tmp_path) == []
    assert tracking.attach(None) is tracking.NULL
    with pytest.raises(ValueError, match="backend"):
        tracking.open_run(str(tmp_path), backend="wandb")


# A real server ----------------------------------------------------------------------------------
def test_server_parent_and_nested_stages(mlflow_server, tmp_path):
    run_dir = str(tmp_path / "run")
    exp = f"test-{uuid.uuid4().hex[:8]}"
    config = {"model": {"preset": "sar-b", "scales": None}, "pretrain": {"steps": 3, "optim": {"lr": 1e-3}}}
    png = tmp_path / "loss.png"
    png.write_bytes(_png())

    tr = tracking.open_run(run_dir, uri=mlflow_server, experiment=exp, params=config,
                           tags={"dataset.digest": "d" * 64})
    with tr:
        with tr.stage("pretrain", f"{run_dir}/pretrain", params={"pretrain": config["pretrain"]},
                      tags={"checkpoint.digest": "c1"}) as pre:
            for step in (1, 2, 3):
                pre.log_metrics({"step": step, "loss": 1.0 / step, "lr": 1e-3, "note": "text is skipped"})
            pre.log_metrics({"step": 3, "fid": 50.0, "accuracy": 0.5}, prefix="eval/")
            pre.log_artifact(str(png))
        with tr.stage("refine", f"{run_dir}/refine") as ref:
            ref.log_metrics({"step": 1, "loss_tf": 0.5, "loss_csf": 0.25, "gap_early": 0.1})
            ref.log_metrics({"fid": 4.2, "inception_score": {"mean": 200.0, "std": 3.0}}, prefix="final/")
            ref.log_artifact(json.dumps({"fid": 4.2}).encode(), name="metrics.json", folder="eval")
    client = _client(mlflow_server)

    parent = client.get_run(tr.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["model.preset"] == "sar-b"
    assert parent.data.params["model.scales"] == "None"
    assert parent.data.params["pretrain.optim.lr"] == "0.001"
    assert parent.data.tags["dataset.digest"] == "d" * 64
    assert parent.data.tags["sar.run_dir"] == run_dir
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tracking.PROJECT_DIR, capture_output=True, text=True)
    if commit.returncode == 0:
        assert parent.data.tags["mlflow.source.git.commit"] == commit.stdout.strip()
    else:
        assert "mlflow.source.git.commit" not in parent.data.tags

    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{tr.run_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"pretrain", "refine"}
    pre_run, ref_run = by_name["pretrain"], by_name["refine"]
    assert pre_run.info.run_id == pre.run_id and ref_run.info.run_id == ref.run_id
    assert pre_run.info.status == ref_run.info.status == "FINISHED"
    assert pre_run.data.params == {"pretrain.steps": "3", "pretrain.optim.lr": "0.001"}
    assert pre_run.data.tags["checkpoint.digest"] == "c1"
    assert _history(client, pre.run_id, "loss") == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    assert _history(client, pre.run_id, "eval/fid") == [(3, 50.0)]
    assert "note" not in pre_run.data.metrics
    assert _history(client, ref.run_id, "gap_early") == [(1, 0.1)]
    assert ref_run.data.metrics["final/inception_score.mean"] == 200.0

    assert [f.path for f in client.list_artifacts(pre.run_id)] == ["loss.png"]
    local = client.download_artifacts(pre.run_id, "loss.png", str(tmp_path / "dl"))
    assert open(local, "rb").read() == png.read_bytes()
    local = client.download_artifacts(ref.run_id, "eval/metrics.json", str(tmp_path / "dl2"))
    assert json.load(open(local)) == {"fid": 4.2}

    record = storage.read_json(f"{run_dir}/pretrain/{tracking.RECORD}")
    assert record["run_id"] == pre.run_id and record["parent_run_id"] == tr.run_id
    assert storage.read_json(f"{run_dir}/{tracking.RECORD}")["run_id"] == tr.run_id
    assert tr.hint() == f"tracking: {mlflow_server}"


def test_resume_continues_the_same_runs_without_duplicate_steps(mlflow_server, tmp_path):
    run_dir, exp = str(tmp_path / "run"), f"test-{uuid.uuid4().hex[:8]}"
    stage_dir = f"{run_dir}/pretrain"
    with tracking.open_run(run_dir, uri=mlflow_server, experiment=exp, params={"a": 1}) as first:
        with first.stage("pretrain", stage_dir) as st:
            for step in (1, 2, 3):
                st.log_metrics({"step": step, "loss": float(step)})
        ids = (first.run_id, st.run_id)
    client = _client(mlflow_server)
    assert client.get_run(ids[1]).info.status == "FINISHED"

    second = tracking.open_run(run_dir, uri=mlflow_server, experiment=exp, params={"a": 2, "b": 3})
    st2 = second.stage("pretrain", stage_dir)
    assert (second.run_id, st2.run_id) == ids
    assert client.get_run(ids[1]).info.status == "RUNNING"  # reopened
    for step in (2, 3, 4, 5):  # a resumed loop re-sends rows after its checkpoint
        st2.log_metrics({"step": step, "loss": 10.0 * step})
    st2.log_metrics({"step": 5, "loss": -1.0})  # within one launch too
    second.close()

    assert _history(client, ids[1], "loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    parent = client.get_run(ids[0])
    assert parent.info.status == "FINISHED"
    assert parent.data.params == {"a": "1", "b": "3"}  # a param keeps its first value
    assert parent.data.tags["changed.a"] == "2"
    runs = client.search_runs([parent.info.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(ids)  # no new runs


def test_worker_attach_logs_into_the_stage_run(mlflow_server, tmp_path):
    run_dir, exp = str(tmp_path / "run"), f"test-{uuid.uuid4().hex[:8]}"
    with tracking.open_run(run_dir, uri=mlflow_server, experiment=exp) as tr:
        st = tr.stage("refine", f"{run_dir}/refine")
        st.log_metrics({"step": 1, "loss": 1.0})
        handoff = st.handoff()
        assert handoff == {"backend": "mlflow", "uri": mlflow_server, "run_id": st.run_id, "mirror": None}
        worker = tracking.attach(json.loads(json.dumps(handoff)))  # as it travels to a Ray worker
        for step in (1, 2):
            worker.log_metrics({"step": step, "loss": 2.0 * step})
        worker.close()
        assert _client(mlflow_server).get_run(st.run_id).info.status == "RUNNING"  # the driver ends it
    client = _client(mlflow_server)
    assert _history(client, st.run_id, "loss") == [(1, 1.0), (2, 4.0)]
    assert client.get_run(st.run_id).info.status == "FINISHED"


# Embedded stores --------------------------------------------------------------------------------
def test_embedded_store_under_a_local_run_dir(tmp_path, caplog):
    run_dir = str(tmp_path / "run")
    with tracking.open_run(run_dir, experiment="sar", params={"x": 1}) as tr:
        with tr.stage("eval", f"{run_dir}/eval") as st:
            st.log_metrics({"fid": 7.0}, prefix="final/")
            st.log_artifact(b"<html></html>", name="report.html")
            st.log_artifact(str(tmp_path / "no-such.png"))  # a caller's mistake: skipped, tracking goes on
            st.log_artifact(b"{}", name="after.json")
    db = os.path.join(run_dir, "mlflow", "mlflow.db")
    assert os.path.isfile(db)
    assert tr.hint() == f"tracking: mlflow ui --backend-store-uri sqlite:///{db}"
    client = _client(tracking.default_uri(run_dir))
    run = client.get_run(st.run_id)
    assert run.data.metrics == {"final/fid": 7.0}
    assert run.data.tags["mlflow.parentRunId"] == tr.run_id
    assert run.info.artifact_uri.startswith(os.path.join(run_dir, "mlflow", "artifacts"))
    assert [f.path for f in client.list_artifacts(st.run_id)] == ["after.json", "report.html"]
    assert [w for w in _warnings(caplog) if "does not exist" in w] == [f"tracking: artifact {tmp_path}/no-such.png "
                                                                       "does not exist; skipped"]
    assert not os.path.exists(os.path.join(os.getcwd(), "mlruns"))


def test_object_store_run_dir_mirrors_and_restores(s3_bucket, tmp_path, monkeypatch):
    """Three launches on two machines (two temp folders): each continues the runs of the last."""
    run_dir = f"{s3_bucket}/runs/a"
    mirror = f"{run_dir}/mlflow/mlflow.db"

    def launch(machine, steps, value):
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / machine))
        os.makedirs(tmp_path / machine, exist_ok=True)
        with tracking.open_run(run_dir) as tr:
            with tr.stage("pretrain", f"{run_dir}/pretrain") as st:
                for step in steps:
                    st.log_metrics({"step": step, "loss": value * step})
                st.log_artifact(b"grid", name="grid.png")
                storage.write_bytes(f"{run_dir}/pretrain/loss.png", b"png of " + machine.encode())
                st.log_artifact(f"{run_dir}/pretrain/loss.png")  # a file of the run directory, by URL
        assert tracking._cache_dir(run_dir).startswith(str(tmp_path / machine))
        return tr, st

    tr, st = launch("a", [1, 2], 1.0)
    ids = (tr.run_id, st.run_id)
    assert storage.exists(mirror)
    assert storage.read_json(f"{run_dir}/pretrain/{tracking.RECORD}")["run_id"] == ids[1]
    assert storage.exists(f"{run_dir}/mlflow/artifacts/{ids[1]}/artifacts/grid.png")  # straight to S3
    assert storage.read_bytes(f"{run_dir}/mlflow/artifacts/{ids[1]}/artifacts/loss.png") == b"png of a"
    assert tr.hint().endswith(f"(mirrored to {mirror})")

    tr, st = launch("b", [2, 3], 10.0)  # no local cache: restored from the mirror
    assert (tr.run_id, st.run_id) == ids
    tr, st = launch("a", [3, 4], 100.0)  # a cache older than the mirror: replaced by it
    assert (tr.run_id, st.run_id) == ids

    local = tmp_path / "mirror.db"
    local.write_bytes(storage.read_bytes(mirror))
    client = _client(f"sqlite:///{local}")
    assert _history(client, ids[1], "loss") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 400.0)]
    assert client.get_run(ids[1]).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(ids[0]).info.experiment_id])) == 2


# Failures ---------------------------------------------------------------------------------------
def test_dead_server_warns_once_and_the_run_goes_on(tmp_path, caplog):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.perf_counter()
    tr = tracking.open_run(str(tmp_path / "run"), uri=uri, params={"a": 1})
    st = tr.stage("pretrain", str(tmp_path / "run" / "pretrain"))
    for step in range(1, 501):
        st.log_metrics({"step": step, "loss": 1.0})
    st.log_artifact(b"x", name="x.txt")
    assert time.perf_counter() - start < 0.5
    assert st.handoff(timeout=30) is None
    st.close()
    tr.close()
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "tracking off" in warnings[0] and "the run goes on" in warnings[0]
    assert not os.path.exists(tmp_path / "run" / "pretrain" / tracking.RECORD)


def test_bad_uri_warns_once(tmp_path, caplog):
    with tracking.open_run(str(tmp_path / "run"), uri="nosuchscheme://x/y") as tr:
        tr.log_metrics({"step": 1, "loss": 1.0})
        assert tr.run_id is None
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "nosuchscheme" in warnings[0], warnings


def test_a_hanging_server_does_not_block_logging(tmp_path, caplog):
    with socket.socket() as listener:  # accepts connections into its backlog, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        tr = tracking.open_run(str(tmp_path / "run"), uri=uri, queue_size=50)
        st = tr.stage("pretrain", str(tmp_path / "run" / "pretrain"))
        slowest = 0.0
        for step in range(1, 201):
            t = time.perf_counter()
            st.log_metrics({"step": step, "loss": 1.0, "lr": 0.1})
            slowest = max(slowest, time.perf_counter() - t)
        assert slowest < 0.05
        t = time.perf_counter()
        tr.close(timeout=1.0)
        assert time.perf_counter() - t < 5
        assert any("queue" in w for w in _warnings(caplog))
    assert tr._sender.failed.wait(30)  # the listener is gone: the sender gives up, once
    assert sum("tracking off" in w for w in _warnings(caplog)) == 1

"""Experiment tracking with MLflow: one parent run per run directory, a nested run per stage.

What goes where
    params     the resolved config, flattened to dotted keys (`pretrain.optim.lr`), values as strings
    tags       `mlflow.source.git.commit` (when the project folder is a git checkout), and what the
               caller passes: dataset manifest digest, checkpoint digests, the run directory
    metrics    training rows (`step`, `loss`, `lr`, ...), evaluation rows, final metrics
    artifacts  files or bytes: loss/gap plots, sample grids, metrics.json, report.html

Stores
    default    an embedded SQLite store, `sqlite:///{run_dir}/mlflow/mlflow.db`, artifacts under
               `{run_dir}/mlflow/artifacts/` (MLflow 3 refuses a new file store `./mlruns` without an
               opt-out, and its own default, SQLite, is what `mlflow ui` reads).
    s3:// etc. SQLite cannot live on an object store, so the database is kept in a local cache
               folder and mirrored to `{run_dir}/mlflow/mlflow.db` (through pipelines.core.storage) at
               every stage end, `sync()` and close; a launch on a machine without that cache (or
               with a cache older than the mirror) restores it from there, so a resumed run
               continues. Artifacts go straight to `{run_dir}/mlflow/artifacts/` with MLflow's own
               S3 client (standard AWS environment). The cache belongs to one node: Ray workers on
               other nodes need a tracking server (`uri=http://...`).
    a server   `uri=http://host:5000`: the server decides where artifacts go.
    a file     `uri=sqlite:////shared/mlflow.db`: artifacts under `/shared/artifacts/`.

Reads/writes `{run_dir}/_tracking.json` (the parent run) and `{stage_out}/_tracking.json` (a stage's
run and its parent), atomically, so a relaunch reopens the same runs; metric rows whose step is not
past the last one already logged for that key are dropped, so a resumed stage may re-send its history.

Nothing here blocks the caller on the network: every call puts an item on a bounded queue that a
background thread sends (MLflow's own async logging still creates runs and the client
synchronously). A tracker that fails (server down, bad URI) logs one warning and turns into a
no-op; the run goes on. Log from rank 0 only; other ranks use `NULL`.

    tracker = tracking.open_run(run_dir, params=cfg.public_dict())
    with tracker, tracker.stage("pretrain", stage_dir) as st:
        st.log_metrics({"step": 50, "loss": 0.9})
    print(tracker.hint())
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import numbers
import os
import queue
import re
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Mapping

from pipelines.core import storage

log = logging.getLogger("sar.tracking")

RECORD = "_tracking.json"
STORE_DIR = "mlflow"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
BACKENDS = ("mlflow", "none")
PROJECT_DIR = Path(__file__).resolve().parent.parent
# MLflow servers before 2.x take param values of at most 500 characters (newer ones 6000): keep to
# the smaller so any server accepts the run; the full config belongs in a config.json artifact.
PARAM_MAX_CHARS = 500
KEY_MAX_CHARS = 250
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")
QUEUE_SIZE = 10_000
CLOSE_TIMEOUT_S = 60.0


# Pure helpers ----------------------------------------------------------------------------------
def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as {dotted.key: string}, long values cut to PARAM_MAX_CHARS."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = _clean_key(f"{prefix}{key}")
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, f"{name}."))
            continue
        text = json.dumps(value) if isinstance(value, (list, tuple, Mapping)) else str(value)
        if len(text) > PARAM_MAX_CHARS:
            note = f"... (+{len(text) - PARAM_MAX_CHARS} chars)"
            text = text[: PARAM_MAX_CHARS - len(note)] + note
        out[name] = text
    return out


def metric_items(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric entries of a row (nested dicts as dotted keys); strings, None and the like are skipped."""
    out: dict[str, float] = {}
    for key, value in row.items():
        name = _clean_key(f"{prefix}{key}")
        if isinstance(value, Mapping):
            out.update(metric_items(value, f"{name}."))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _clean_key(key: str) -> str:
    """MLflow accepts letters, digits, `_ - . /` and spaces in names; anything else becomes `_`."""
    return _BAD_KEY_CHARS.sub("_", str(key))[:KEY_MAX_CHARS]


def git_commit(folder: str | os.PathLike = PROJECT_DIR) -> str | None:
    """`git rev-parse HEAD` in `folder`, or None when it is not a checkout (or git is absent)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def _cache_dir(run_dir: str) -> str:
    """The local folder that holds the store of an object-store run directory on this node."""
    key = uuid.uuid5(uuid.NAMESPACE_URL, storage.redact(run_dir).rstrip("/")).hex
    return os.path.join(tempfile.gettempdir(), "sar-cache", f"mlflow-{key}")


def _sqlite_uri(path: str) -> str:
    return "sqlite:///" + os.path.abspath(path)  # four slashes for an absolute path


def default_uri(run_dir: str) -> str:
    """The embedded store of a run directory (a local cache folder when run_dir is an object store)."""
    if storage.is_local(run_dir):
        return _sqlite_uri(os.path.join(str(run_dir).removeprefix("file://"), STORE_DIR, DB_FILE))
    return _sqlite_uri(os.path.join(_cache_dir(run_dir), DB_FILE))


def hint(run_dir: str, backend: str = "mlflow", uri: str | None = None) -> str:
    """The line to print at the end of a command: how to look at the tracked runs."""
    if backend == "none":
        return "tracking: off"
    if uri:
        if uri.startswith(("http://", "https://")):
            return f"tracking: {storage.redact(uri)}"
        return f"tracking: mlflow ui --backend-store-uri {storage.redact(uri)}"
    line = f"tracking: mlflow ui --backend-store-uri {default_uri(run_dir)}"
    if not storage.is_local(run_dir):
        line += f"  (mirrored to {storage.redact(storage.join(run_dir, STORE_DIR, DB_FILE))})"
    return line


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _import_mlflow():
    """MLflow, imported on first use (seconds), with its usage telemetry off unless the user asked."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the command prints hint()
    import mlflow.tracking  # noqa: F401  (the import that takes the time)
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    for name in ("mlflow.store.db.utils", "alembic"):  # table creation is not news on every launch
        if logging.getLogger(name).level < logging.WARNING:
            logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient, Metric, Param, RunTag


# The mirror of an embedded store on an object store --------------------------------------------
class _Mirror:
    """Copies a local SQLite store to `{run_dir}/mlflow/mlflow.db` and back.

    `mirror.sha256` beside the cache records the digest of the last copy made either way: a mirror
    with that digest is an ancestor of the cache (keep the cache, it may hold more); any other
    mirror was written elsewhere since, and replaces the cache.
    """

    def __init__(self, db_path: str, url: str, storage_options: dict[str, Any] | None):
        self.db_path, self.url, self.storage_options = db_path, url, storage_options
        self.marker = db_path + ".mirror.sha256"

    def restore(self) -> None:
        if not storage.exists(self.url, self.storage_options):
            return
        data = storage.read_bytes(self.url, self.storage_options)
        digest = hashlib.sha256(data).hexdigest()
        if os.path.exists(self.db_path) and self._marked() == digest:
            return
        os.makedirs(os.path.dirname(self.db_path), exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="sar-mlflow-") as tmp:
            src = os.path.join(tmp, DB_FILE)
            with open(src, "wb") as f:
                f.write(data)
            self._copy(src, self.db_path)  # in place: open connections see the restored content
        self._mark(digest)
        log.info("tracking store restored from %s", storage.redact(self.url))

    def upload(self) -> None:
        if not os.path.exists(self.db_path):
            return
        with tempfile.TemporaryDirectory(prefix="sar-mlflow-") as tmp:
            snap = os.path.join(tmp, DB_FILE)
            self._copy(self.db_path, snap)  # a consistent snapshot while other writers may be active
            with open(snap, "rb") as f:
                data = f.read()
        storage.write_bytes(self.url, data, self.storage_options)
        self._mark(hashlib.sha256(data).hexdigest())

    @staticmethod
    def _copy(src: str, dst: str) -> None:
        """SQLite's online backup: a whole, consistent database even while `src` is being written."""
        with contextlib.closing(sqlite3.connect(src)) as a, contextlib.closing(sqlite3.connect(dst)) as b:
            a.backup(b)

    def _marked(self) -> str | None:
        try:
            with open(self.marker) as f:
                return f.read().strip()
        except OSError:
            return None

    def _mark(self, digest: str) -> None:
        storage.write_text(self.marker, digest + "\n")


# The background sender ------------------------------------------------------------------------
class _Ref:
    """A run id that the sender fills in once the run exists (or gives up on)."""

    def __init__(self, run_id: str | None = None):
        self.id = run_id
        self.ready = threading.Event()


class _Sender:
    """The background thread of one `open_run` (or `attach`): it owns the MLflow client and sends, in
    order, what the trackers queue. The first error switches it off with a single warning."""

    def __init__(self, uri: str, artifact_root: str | None, mirror: _Mirror | None,
                 storage_options: dict[str, Any] | None, queue_size: int = QUEUE_SIZE):
        self.uri, self.artifact_root, self.mirror, self.storage_options = uri, artifact_root, mirror, storage_options
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.failed = threading.Event()
        self.refs: list[_Ref] = []
        self.last_step: dict[tuple[str, str], int] = {}  # (run id, metric key) -> last step logged
        self.client = None
        self._dropped = 0
        self._thread = threading.Thread(target=self._loop, name="sar-tracking", daemon=True)
        self._thread.start()

    # Caller side: never blocks.
    def put(self, op: str, *args: Any) -> None:
        if self.failed.is_set():
            return
        try:
            self.queue.put_nowait((op, args))
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1:
                log.warning("tracking: the queue of %d items is full (the store is slow); dropping until it drains",
                            self.queue.maxsize)

    def stop(self, timeout: float) -> bool:
        """Send what is queued, then end the thread; False when it did not finish in time."""
        if self._thread.is_alive() and not self.failed.is_set():
            try:
                self.queue.put(("stop", ()), timeout=timeout)
            except queue.Full:
                log.warning("tracking: the queue stayed full for %.0f s (the store is slow); %d items not sent",
                            timeout, self.queue.qsize())
                return False
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("tracking: %d items not sent after %.0f s; giving up on them", self.queue.qsize(), timeout)
            return False
        return True

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is sent (True), or the timeout passes (False)."""
        done = threading.Event()
        self.put("flush", done)
        return self.failed.is_set() or done.wait(timeout) or self.failed.is_set()

    # Thread side.
    def _loop(self) -> None:
        while True:
            op, args = self.queue.get()
            if op == "stop":
                return
            try:
                getattr(self, f"_do_{op}")(*args)
            except Exception as err:  # noqa: BLE001  (any failure of the store: warn once, go on without it)
                self._fail(op, err)
                return

    def _fail(self, op: str, err: BaseException) -> None:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning("tracking off for the rest of this command: %s failed (%s: %s); the run goes on",
                    op.replace("_", " "), type(err).__name__, first[:300])
        self.failed.set()
        for ref in self.refs:
            ref.ready.set()
        while True:  # release whoever waits on a flush; later puts are dropped
            try:
                op, args = self.queue.get_nowait()
            except queue.Empty:
                return
            if op == "flush":
                args[0].set()

    def _connect(self):
        if self.client is not None:
            return self.client
        if _is_server(self.uri):  # fail fast and clearly instead of MLflow's minutes of retries
            with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=10) as r:
                if r.status != 200:
                    raise ConnectionError(f"{storage.redact(self.uri)}/health answered {r.status}")
        elif self.uri.startswith("sqlite:///"):
            path = self.uri.removeprefix("sqlite:///")
            if self.mirror is not None:
                self.mirror.restore()
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        MlflowClient, *_ = _import_mlflow()
        self.client = MlflowClient(tracking_uri=self.uri)
        return self.client

    def _experiment_id(self, name: str) -> str:
        client = self._connect()
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage != "active":
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        return client.create_experiment(name, artifact_location=self.artifact_root)

    def _reopen(self, record: dict[str, Any] | None, store: str) -> str | None:
        """The recorded run's id when it is in this store and not deleted, else None."""
        if not record or record.get("store") != store or not record.get("run_id"):
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(record["run_id"])
        except MlflowException as err:
            if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        if run.info.lifecycle_stage != "active":
            return None
        self.client.update_run(run.info.run_id, status="RUNNING")
        self._load_last_steps(run)
        return run.info.run_id

    def _load_last_steps(self, run) -> None:
        for key in run.data.metrics:
            steps = [m.step for m in self.client.get_metric_history(run.info.run_id, key)]
            if steps:
                self.last_step[(run.info.run_id, key)] = max(steps)

    def _do_open(self, ref: _Ref, parent: _Ref | None, record_url: str, store: str, experiment: str,
                 name: str, tags: dict[str, str]) -> None:
        client = self._connect()
        try:
            record = storage.read_json(record_url, self.storage_options)
        except storage.NotFound:
            record = None
        except storage.StorageError as err:
            if type(err) is not storage.StorageError:  # the store itself fails (bucket, credentials, network)
                raise
            log.warning("tracking: %s is unreadable (%s); starting a new run", storage.redact(record_url), err)
            record = None
        exp_id = self._experiment_id(experiment)
        run_id = self._reopen(record, store)
        if parent is not None and parent.id is None:
            raise RuntimeError("the parent run was not created")
        if run_id is None:
            run_tags = {**tags, **({"mlflow.parentRunId": parent.id} if parent else {})}
            run_id = client.create_run(exp_id, run_name=name, tags=run_tags).info.run_id
        elif tags:
            self._do_tags(_Ref(run_id), tags)
        ref.id = run_id
        out = {"backend": "mlflow", "store": store, "experiment_id": exp_id, "run_id": run_id, "run_name": name}
        if parent is not None:
            out["parent_run_id"] = parent.id
        storage.write_json(record_url, out, self.storage_options)
        ref.ready.set()

    def _do_attach(self, ref: _Ref) -> None:
        client = self._connect()
        self._load_last_steps(client.get_run(ref.id))
        ref.ready.set()

    def _do_params(self, ref: _Ref, params: dict[str, str]) -> None:
        _, _, Param, _ = _import_mlflow()
        have = self.client.get_run(ref.id).data.params
        # A resumed run keeps its params (MLflow refuses to change one); a changed value is a tag.
        new = [Param(k, v) for k, v in params.items() if k not in have]
        changed = {f"changed.{k}": v for k, v in params.items() if k in have and have[k] != v}
        for i in range(0, len(new), 100):  # MLflow's MAX_PARAMS_TAGS_PER_BATCH
            self.client.log_batch(ref.id, params=new[i:i + 100], synchronous=True)
        if changed:
            self._do_tags(ref, changed)

    def _do_tags(self, ref: _Ref, tags: dict[str, str]) -> None:
        _, _, _, RunTag = _import_mlflow()
        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(ref.id, tags=items[i:i + 100], synchronous=True)

    def _do_metrics(self, ref: _Ref, values: dict[str, float], step: int, timestamp_ms: int, dedup: bool) -> None:
        _, Metric, _, _ = _import_mlflow()
        batch = []
        for key, value in values.items():
            last = self.last_step.get((ref.id, key))
            if dedup and last is not None and step <= last:
                continue  # already logged by an earlier launch (or earlier in this one)
            batch.append(Metric(key, value, timestamp_ms, step))
            if dedup:
                self.last_step[(ref.id, key)] = step
        if batch:
            self.client.log_batch(ref.id, metrics=batch, synchronous=True)

    def _do_artifact(self, ref: _Ref, src: str | bytes, name: str | None, folder: str | None) -> None:
        if isinstance(src, bytes):
            with tempfile.TemporaryDirectory(prefix="sar-artifact-") as tmp:
                path = os.path.join(tmp, name)
                with open(path, "wb") as f:
                    f.write(src)
                self.client.log_artifact(ref.id, path, artifact_path=folder)
            return
        if not storage.is_local(src):  # a file of an object-store run directory
            try:
                data = storage.read_bytes(src, self.storage_options)
            except storage.NotFound:
                log.warning("tracking: artifact %s does not exist; skipped", storage.redact(src))
                return
            self._do_artifact(ref, data, name or src.rstrip("/").rsplit("/", 1)[-1], folder)
            return
        src = src.removeprefix("file://")
        if not os.path.isfile(src):
            log.warning("tracking: artifact %s does not exist; skipped", src)
            return
        if name and name != os.path.basename(src):
            with tempfile.TemporaryDirectory(prefix="sar-artifact-") as tmp:
                path = os.path.join(tmp, name)
                shutil.copyfile(src, path)
                self.client.log_artifact(ref.id, path, artifact_path=folder)
            return
        self.client.log_artifact(ref.id, src, artifact_path=folder)

    def _do_terminate(self, ref: _Ref, status: str) -> None:
        self.client.set_terminated(ref.id, status)

    def _do_mirror(self) -> None:
        if self.mirror is not None and self.client is not None:
            self.mirror.upload()

    def _do_flush(self, done: threading.Event) -> None:
        done.set()


# Trackers ----------------------------------------------------------------------------------------
class Tracker:
    """The no-op tracker (backend `none`, ranks other than 0): every call does nothing."""

    enabled = False

    def stage(self, name: str, out_dir: str, *, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None) -> "Tracker":
        return self

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, row: Mapping[str, Any], *, prefix: str = "", step: int | None = None) -> None:
        pass

    def log_artifact(self, src: str | bytes, name: str | None = None, folder: str | None = None) -> None:
        pass

    def handoff(self, timeout: float = 60.0) -> dict[str, Any] | None:
        return None

    @property
    def run_id(self) -> str | None:
        return None

    def sync(self, wait: bool = True, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        return True

    def close(self, status: str = "FINISHED", timeout: float = CLOSE_TIMEOUT_S) -> None:
        pass

    def hint(self) -> str:
        return "tracking: off"

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        # KeyboardInterrupt, a stop signal (core.stop.Stopped), SystemExit: not failures of the run.
        status = "FINISHED" if exc_type is None else "FAILED" if issubclass(exc_type, Exception) else "KILLED"
        self.close(status)
        return False


NULL = Tracker()


class MlflowTracker(Tracker):
    """A parent run (from `open_run`), one of its stages (`.stage`), or a run a worker logs into (`attach`)."""

    @property
    def enabled(self) -> bool:
        """True until the tracker failed (it then warned once and went quiet)."""
        return not self._sender.failed.is_set()

    def __init__(self, sender: _Sender, ref: _Ref, *, experiment: str, store: str, hint_line: str,
                 owns_sender: bool, owns_run: bool = True):
        self._sender, self._ref, self._experiment, self._store = sender, ref, experiment, store
        self._hint, self._owns_sender, self._owns_run = hint_line, owns_sender, owns_run
        self._children: list[MlflowTracker] = []
        self._closed = False

    # Runs.
    def stage(self, name: str, out_dir: str, *, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None) -> "MlflowTracker":
        """A nested run for the stage writing `out_dir`; reopened when `out_dir/_tracking.json` names it."""
        ref = _Ref()
        self._sender.refs.append(ref)
        self._sender.put("open", ref, self._ref, storage.join(out_dir, RECORD), self._store, self._experiment, name,
                         {"sar.stage": name, "sar.output": storage.redact(out_dir), **_strings(tags or {})})
        child = MlflowTracker(self._sender, ref, experiment=self._experiment, store=self._store,
                              hint_line=self._hint, owns_sender=False)
        self._children.append(child)
        if params:
            child.log_params(params)
        return child

    @property
    def run_id(self) -> str | None:
        """The MLflow run id once the run exists (waits up to a minute for the background thread)."""
        self._ref.ready.wait(60.0)
        return self._ref.id

    def handoff(self, timeout: float = 60.0) -> dict[str, Any] | None:
        """What a Ray worker needs to log into this run (`attach`); None when tracking is off.

        Sends what is queued first, so the worker's view of the last logged steps is current."""
        if not self._sender.flush(timeout) or self._ref.id is None or self._sender.failed.is_set():
            return None
        mirror = self._sender.mirror
        return {"backend": "mlflow", "uri": self._sender.uri, "run_id": self._ref.id,
                "mirror": mirror.url if mirror else None}

    # Data.
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params from a (nested) config: flattened, stringified, cut to MLflow's limit."""
        self._sender.put("params", self._ref, flatten_params(params))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._sender.put("tags", self._ref, _strings(tags))

    def log_metrics(self, row: Mapping[str, Any], *, prefix: str = "", step: int | None = None) -> None:
        """The numbers of one row. With a step (`row["step"]` or `step=`) a step not past the last one
        logged for a key is dropped; without one they are final values, logged at step 0."""
        step = row.get("step") if step is None else step
        values = metric_items({k: v for k, v in row.items() if k != "step"}, prefix)
        if values:
            self._sender.put("metrics", self._ref, values, int(step or 0), int(time.time() * 1000), step is not None)

    def log_artifact(self, src: str | bytes, name: str | None = None, folder: str | None = None) -> None:
        """A file (a local path or a URL; sent as `name`, default its own name) or bytes named `name`, under
        `folder`. The file is read when the background thread sends it."""
        if isinstance(src, (bytes, bytearray)):
            if not name:
                raise ValueError("log_artifact: bytes need a name")
            src = bytes(src)
        else:
            src = os.fspath(src)
        self._sender.put("artifact", self._ref, src, name, folder)

    # Ending.
    def sync(self, wait: bool = True, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Mirror the store (object-store run directories) after what is queued; with `wait`, block until
        done (True) or `timeout`. A training loop calls it with wait=False at each checkpoint."""
        self._sender.put("mirror")
        return self._sender.flush(timeout) if wait else True

    def close(self, status: str = "FINISHED", timeout: float = CLOSE_TIMEOUT_S) -> None:
        """End the run with `status` (its open stages first), mirror the store, stop the sender if ours."""
        if self._closed:
            return
        self._closed = True
        for child in self._children:
            child.close(status, timeout)
        if self._owns_run:
            self._sender.put("terminate", self._ref, status)
        self._sender.put("mirror")
        if self._owns_sender:
            self._sender.stop(timeout)
        else:
            self._sender.flush(timeout)

    def hint(self) -> str:
        return self._hint


def _strings(tags: Mapping[str, Any]) -> dict[str, str]:
    return {_clean_key(k): str(v) for k, v in tags.items() if v is not None}


def open_run(run_dir: str, *, backend: str = "mlflow", uri: str | None = None, experiment: str = "sar",
             name: str | None = None, params: Mapping[str, Any] | None = None,
             tags: Mapping[str, Any] | None = None, storage_options: dict[str, Any] | None = None,
             queue_size: int = QUEUE_SIZE) -> Tracker:
    """The parent run of `run_dir` (reopened from `{run_dir}/_tracking.json`), or NULL for backend none.

    Returns at once; the store is opened by the background thread.
    """
    if backend not in BACKENDS:
        raise ValueError(f"tracking backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "none":
        return NULL
    run_dir = str(run_dir).rstrip("/")
    mirror = artifacts = None  # a server decides where artifacts go; other stores are told (else ./mlruns)
    if uri is None:
        store_uri, store = default_uri(run_dir), "embedded"
        if storage.is_local(run_dir):
            artifacts = os.path.join(os.path.abspath(run_dir.removeprefix("file://")), STORE_DIR, ARTIFACTS_DIR)
        else:
            artifacts = storage.join(run_dir, STORE_DIR, ARTIFACTS_DIR)
            mirror = _Mirror(store_uri.removeprefix("sqlite:///"), storage.join(run_dir, STORE_DIR, DB_FILE),
                             storage_options)
    else:
        store_uri, store = uri, storage.redact(uri)
        if uri.startswith("sqlite:///"):  # a shared database file: artifacts beside it
            artifacts = os.path.join(os.path.dirname(os.path.abspath(uri.removeprefix("sqlite:///"))), ARTIFACTS_DIR)
    sender = _Sender(store_uri, artifacts, mirror, storage_options, queue_size)
    ref = _Ref()
    sender.refs.append(ref)
    all_tags = {"sar.run_dir": storage.redact(run_dir), **_strings(tags or {})}
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    run_name = name or os.path.basename(storage.redact(run_dir)) or "run"
    sender.put("open", ref, None, storage.join(run_dir, RECORD), store, experiment, run_name, all_tags)
    tracker = MlflowTracker(sender, ref, experiment=experiment, store=store, hint_line=hint(run_dir, backend, uri),
                            owns_sender=True)
    if params:
        tracker.log_params(params)
    return tracker


def attach(handoff: Mapping[str, Any] | None, storage_options: dict[str, Any] | None = None,
           queue_size: int = QUEUE_SIZE) -> Tracker:
    """Log into an existing run from another process (a Ray Train worker, rank 0); NULL when None.

    The run stays open: its owner (the driver's stage tracker) ends it.
    """
    if not handoff:
        return NULL
    uri = handoff["uri"]
    mirror = None
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        if not os.path.exists(path):  # a database file lives on the driver's node
            log.warning("tracking off in this worker: the run's store %s is on another node; "
                        "use a tracking server (uri=http://...) for multi-node runs", path)
            return NULL
        if handoff.get("mirror"):
            mirror = _Mirror(path, handoff["mirror"], storage_options)
    sender = _Sender(uri, None, mirror, storage_options, queue_size)
    ref = _Ref(handoff["run_id"])
    sender.refs.append(ref)
    sender.put("attach", ref)
    return MlflowTracker(sender, ref, experiment="", store="", hint_line=hint("", "mlflow", uri),
                         owns_sender=True, owns_run=False)

"""Writer leases: one process at a time writes a stage's output folder.

A lease is one small JSON object inside the output folder, `{output}/_writer.lease`
(LEASE_FILE), that names its owner (host, pid, a random id, since when, the command, and what
tells its process apart on its machine: boot and pid namespace, the process's start time) and
when it was last renewed. Every name the lease uses starts with `_writer.lease` (LEASE_PREFIX):
stage clean-ups must leave those names alone, and readers never take them for data.

    acquire   no lease: create one with an exclusive create (fails if the name exists).
              A lease not renewed within its ttl, or whose holder ran on this machine and is
              gone (`holder_gone`: its pid is not running, or runs another process since),
              is replaced at once, conditioned on the version that was read (compare-and-swap),
              so of two takers exactly one wins; taking a dead holder's lease is a warning.
              A live lease: poll until `wait_s` runs out, then raise LeaseHeld naming the owner.
    renew     a daemon thread rewrites the lease every ttl/3, conditioned on the version it
              wrote last; when the condition fails and the lease is someone else's, the
              lease is lost: `held` turns False and `check()` raises LeaseLost.
    check()   the stage calls it before each commit. It also renews when the last renewal
              is older than ttl/2, so a commit that starts right after it has at least ttl/2
              before anyone may take over; keep each commit shorter than that.
    release   delete the lease, conditioned on the version written last (never someone else's).

Stores and their atomic primitives:

    local     create: link(2) of a fully written temporary onto LEASE_FILE, which fails when
              the name exists (as O_CREAT|O_EXCL does) and publishes the content whole.
              Compare-and-swap: read, compare, write a temporary and rename it over, all under
              fcntl.flock on the sidecar `_writer.lease.lock`, which every lease operation
              takes (the sidecar goes with the lease on release). Age: the host clock minus
              the renewal time written in the lease.
              On NFS, flock is mapped to POSIX byte-range locks and works across hosts only
              when the mount has working locking (NFSv4, or NFSv3 with lockd; not `nolock` or
              `local_lock=all`), and the hosts' clocks must agree to well under the ttl.
    s3        create: PutObject with IfNoneMatch="*"; renew / take over: PutObject with
              IfMatch=<etag>; release: DeleteObject with IfMatch=<etag> (AWS S3 has had all
              three on general purpose buckets since 2024-2025; an S3-compatible store that
              ignores these headers gives no exclusion). Age: the store's own clock, the
              reply's Date minus the lease's LastModified, less one second for their
              whole-second resolution, so no client clock enters; a waiting taker also counts
              how long it has seen the same version unchanged.
    other     LeaseUnsupported: no atomic create-if-absent is known for the protocol.

A retried request may find its own earlier attempt already applied (a conditional write
that succeeded but whose reply was lost then fails its retry); every conflict is therefore
settled by reading the lease back and comparing the owner id and renewal count with ours.

Usage:

    with WriterLease(output_url, storage_options, ttl_s=60, wait_s=0) as lease:
        ...                 # clean up, write
        lease.check()       # before each commit
        commit()

Another process (a Ray Train worker) checks the lease it does not hold with
`lease.token().check(storage_options)`, one read of the lease object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shlex
import socket
import sys
import threading
import time
import uuid
from typing import Any, Iterator

import psutil

from pipelines.core import storage
from pipelines.core.errors import SarError

log = logging.getLogger(__name__)

LEASE_FILE = "_writer.lease"
LEASE_PREFIX = "_writer.lease"  # the lease, its lock sidecar and its temporaries
DEFAULT_TTL_S = 60.0
_S3_CLOCK_RESOLUTION_S = 1.0  # Date and LastModified are whole seconds
_MAX_CONFLICTS = 20  # lost races while acquiring before waiting as for a held lease
_SECRET_ARG = re.compile(r"(?i)((?:secret|token|password|passwd|key)[^=\s]*=)\S+")


class LeaseError(SarError):
    """A writer lease cannot be taken or kept."""


class LeaseHeld(LeaseError):
    """Another live process holds the output's writer lease."""


class LeaseLost(LeaseError):
    """This process no longer holds the writer lease: it must stop before its next commit."""


class LeaseUnsupported(LeaseError):
    """The output's store offers no atomic create, so no lease can be kept there."""


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@functools.cache
def _machine() -> str | None:
    """What makes a pid mean one process here: the kernel's boot id and this process's pid namespace
    (Linux), so that a host name shared by two machines, a rebooted machine or two containers on
    one host network (one host name, two pid namespaces) never compare equal. None elsewhere: the
    leases of a machine that cannot say this wait out their ttl."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch, as psutil reads /proc), None if it is gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def holder_gone(owner: dict[str, Any]) -> str | None:
    """Why a lease's holder is certainly dead, or None: it ran on this machine (host name, boot and
    pid namespace) and its pid is not running, or runs a process that started at another time (the
    pid was reused), or is a zombie. A holder elsewhere, or one that recorded no start time (an
    older release), keeps its lease until the ttl."""
    machine = _machine()
    if (machine is None or owner.get("host") != socket.gethostname() or owner.get("machine") != machine
            or owner.get("started") is None or not isinstance(owner.get("pid"), int)):
        return None
    pid = owner["pid"]
    started = _started(pid)
    if started is None:
        return f"pid {pid} is not running on this host"
    if abs(started - float(owner["started"])) > 0.05:  # create_time counts clock ticks (10 ms) since boot
        return f"pid {pid} is another process now (started {_utc(started)})"
    try:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return f"pid {pid} has exited"
    except psutil.Error:
        return f"pid {pid} is not running on this host"
    return None


def _command(argv: list[str]) -> str:
    """The command line, short, with URLs redacted and `...secret=VALUE` values blanked."""
    args = [os.path.basename(argv[0])] + list(argv[1:]) if argv else []
    text = " ".join(shlex.quote(storage.redact(a)) for a in args)
    text = _SECRET_ARG.sub(r"\1***", text)
    return text if len(text) <= 160 else text[:157] + "..."


@dataclasses.dataclass(frozen=True)
class LeaseInfo:
    """What a lease says, and how long ago it was renewed."""

    url: str  # the lease object
    owner: dict[str, Any]  # host, pid, id, since, command
    ttl_s: float
    renewals: int
    age_s: float  # seconds since the last renewal (never more than the truth)

    @property
    def expired(self) -> bool:
        return self.age_s > self.ttl_s

    def describe(self) -> str:
        """`host h pid 12 since 2026-01-01T00:00:00Z (sar encode ...)`."""
        o = self.owner
        return f"host {o.get('host')} pid {o.get('pid')} since {o.get('since')} ({o.get('command') or '?'})"


@dataclasses.dataclass
class _Read:
    record: dict[str, Any]
    version: str  # the store's version of the object: an ETag, or a digest of the content
    info: LeaseInfo


# Stores ------------------------------------------------------------------------------------
def _parse(data: bytes, url: str, age_of) -> tuple[dict, LeaseInfo]:
    try:
        record = json.loads(data)
        info = LeaseInfo(url, dict(record["owner"]), float(record["ttl_s"]), int(record["renewals"]),
                         float(age_of(record)))
    except (ValueError, KeyError, TypeError):
        raise storage.StorageError(f"{url} is not a writer lease (unreadable); delete it if no stage is "
                                   "writing this folder", url) from None
    return record, info


class _LocalStore:
    """A lease file on a local (or NFS) disk; compare-and-swap under flock on a sidecar."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, LEASE_FILE)
        self.lock_path = self.path + ".lock"
        self.url = self.path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the sidecar's exclusive flock (the sidecar that is at its path now)."""
        os.makedirs(self.folder, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # A release may have unlinked the sidecar between our open and our lock: a lock
                # on that orphan guards nothing, so open the current one again.
                try:
                    current = os.stat(self.lock_path)
                except FileNotFoundError:
                    continue
                mine = os.fstat(fd)
                if (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
                    yield
                    return
            finally:
                os.close(fd)  # closing the descriptor drops the flock
        raise storage.StorageError(f"{self.lock_path}: cannot lock (it keeps being replaced)", self.lock_path)

    def read(self) -> _Read | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        record, info = _parse(data, self.path, lambda r: max(0.0, time.time() - float(r["renewed"])))
        return _Read(record, hashlib.sha256(data).hexdigest(), info)

    def _temporary(self, record: dict) -> tuple[str, str]:
        data = json.dumps(record, sort_keys=True).encode()
        tmp = f"{self.path}.{uuid.uuid4().hex}.new"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp, hashlib.sha256(data).hexdigest()

    def create(self, record: dict) -> str:
        with storage.translate_errors(self.url), self._locked():
            tmp, version = self._temporary(record)
            try:
                os.link(tmp, self.path)  # atomic, and fails if the lease exists
            except FileExistsError:
                raise storage.Conflict(f"{self.path}: exists", self.path) from None
            finally:
                os.unlink(tmp)
            return version

    def replace(self, record: dict, version: str) -> str:
        with storage.translate_errors(self.url), self._locked():
            current = self.read()
            if current is None or current.version != version:
                raise storage.Conflict(f"{self.path}: changed by another writer", self.path)
            tmp, new = self._temporary(record)
            os.replace(tmp, self.path)
            return new

    def delete(self, version: str) -> None:
        with storage.translate_errors(self.url), self._locked():
            current = self.read()
            if current is None:
                return
            if current.version != version:
                raise storage.Conflict(f"{self.path}: changed by another writer", self.path)
            os.unlink(self.path)
            os.unlink(self.lock_path)  # under its own lock; lockers check they hold the current one


class _S3Store:
    """A lease object on S3; conditional PutObject / DeleteObject on its ETag."""

    def __init__(self, folder_url: str, storage_options: dict | None):
        self.fs, folder = storage.filesystem(folder_url, storage_options)
        self.bucket, prefix, _ = self.fs.split_path(folder.rstrip("/"))
        self.key = f"{prefix}/{LEASE_FILE}" if prefix else LEASE_FILE
        self.url = f"s3://{self.bucket}/{self.key}"
        self.storage_options = storage_options

    def _errors(self):
        return storage.translate_errors(self.url, self.storage_options)

    async def _get(self) -> tuple[bytes, str, Any, str]:
        resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
        try:
            data = await resp["Body"].read()
        finally:
            resp["Body"].close()
        return data, resp["ETag"], resp["LastModified"], resp["ResponseMetadata"]["HTTPHeaders"]["date"]

    def read(self) -> _Read | None:
        from fsspec.asyn import sync

        try:
            with self._errors():
                data, etag, modified, date = sync(self.fs.loop, self._get)
        except storage.NotFound:
            return None
        server_age = (email.utils.parsedate_to_datetime(date) - modified).total_seconds() - _S3_CLOCK_RESOLUTION_S
        record, info = _parse(data, self.url, lambda r: max(0.0, server_age))
        return _Read(record, etag, info)

    def _put(self, record: dict, **condition: str) -> str:
        body = json.dumps(record, sort_keys=True).encode()
        with self._errors():
            try:
                resp = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body,
                                       ContentType="application/json", **condition)
            except FileNotFoundError:  # IfMatch on an object that is gone
                raise storage.Conflict(f"{self.url}: gone", self.url) from None
        return resp["ETag"]

    def create(self, record: dict) -> str:
        return self._put(record, IfNoneMatch="*")

    def replace(self, record: dict, version: str) -> str:
        return self._put(record, IfMatch=version)

    def delete(self, version: str) -> None:
        try:
            with self._errors():
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
        except storage.NotFound:
            return
        finally:
            self.fs.invalidate_cache(f"{self.bucket}/{self.key}")


def _store(output_url: str, storage_options: dict | None):
    url = str(output_url)
    if storage.is_local(url):
        return _LocalStore(url.removeprefix("file://"))
    if url.split("://", 1)[0].lower() in ("s3", "s3a"):
        return _S3Store(url, storage_options)
    raise LeaseUnsupported(f"{storage.redact(url)}: writer leases need a local path or s3:// (no atomic "
                           f"create-if-absent is known for {url.split('://', 1)[0]}://); write to one of those")


def lease_status(output_url: str, storage_options: dict | None = None) -> LeaseInfo | None:
    """The writer lease of an output folder, or None when nobody holds it."""
    current = _store(output_url, storage_options).read()
    return current.info if current else None


@dataclasses.dataclass(frozen=True)
class LeaseToken:
    """A lease's identity, for a process that does not hold it (a Ray Train worker) to check it."""

    output_url: str
    owner_id: str

    def check(self, storage_options: dict | None = None) -> None:
        """Raise LeaseLost unless the lease is the holder's and was renewed within ttl/2 (one read).

        The holder renews every ttl/3, so an older renewal means its heartbeat is failing;
        the ttl/2 left is the time a commit that starts now has before anyone may take over.
        """
        current = _store(self.output_url, storage_options).read()
        if current is None or current.record["owner"].get("id") != self.owner_id:
            raise LeaseLost(_lost_message(self.output_url, current))
        if current.info.age_s > current.info.ttl_s / 2:
            raise LeaseLost(f"the writer lease of {storage.redact(self.output_url)} was not renewed for "
                            f"{current.info.age_s:.0f} s (ttl {current.info.ttl_s:g} s); stop before committing")


def _lost_message(output_url: str, current: _Read | None) -> str:
    where = storage.redact(output_url)
    if current is None:
        return f"the writer lease of {where} was deleted by someone else; stop: this run no longer owns the output"
    return (f"the writer lease of {where} was taken over by {current.info.describe()}; stop: that process "
            "owns the output now")


# The lease -----------------------------------------------------------------------------------
class WriterLease:
    """The exclusive right to write one output folder, kept alive by a heartbeat thread."""

    def __init__(self, output_url: str, storage_options: dict | None = None, ttl_s: float = DEFAULT_TTL_S,
                 wait_s: float = 0.0, heartbeat: bool = True, command: str | None = None):
        if ttl_s <= 0 or wait_s < 0:
            raise ValueError(f"ttl_s must be > 0 and wait_s >= 0, got {ttl_s}, {wait_s}")
        self.output_url = str(output_url)
        self.ttl_s, self.wait_s, self.heartbeat = float(ttl_s), float(wait_s), heartbeat
        self._store = _store(output_url, storage_options)
        self.url = self._store.url  # the lease object itself
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex,
                      "since": None, "command": command if command is not None else _command(sys.argv),
                      "machine": _machine(), "started": _started(os.getpid())}
        self._version: str | None = None
        self._renewals = 0
        self._renewed_at = 0.0  # time.monotonic() when the last successful write was sent
        self._lost: str | None = None
        self._lock = threading.Lock()  # one write at a time: the heartbeat and check() both renew
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # Taking and giving back
    def acquire(self) -> WriterLease:
        """Take the lease, waiting up to wait_s for a live owner; LeaseHeld if it stays held."""
        if self._version is not None:
            raise LeaseError(f"the writer lease of {storage.redact(self.output_url)} is already held by this object")
        deadline = time.monotonic() + self.wait_s
        poll = min(1.0, max(0.05, self.ttl_s / 4))
        seen: tuple[str, float] | None = None  # (version, when this process first saw it)
        conflicts = 0
        while True:
            current = self._store.read()
            if current is not None and (seen is None or seen[0] != current.version):
                seen = (current.version, time.monotonic())
            self.owner["since"] = _utc(time.time())
            try:
                if current is None:
                    self._took(self._store.create(self._record(0)), "acquired")
                    return self
                if current.record["owner"].get("id") == self.owner["id"]:  # our retried create landed
                    self._took(current.version, "acquired")
                    return self
                gone = holder_gone(current.info.owner)
                if gone:  # killed (kill -9, OOM) on this machine: no need to wait out its ttl
                    self._took(self._store.replace(self._record(0), current.version),
                               f"taken over from {current.info.describe()}: {gone}")
                    return self
                # Unchanged for longer than its ttl while we watched: expired, whatever the clocks say.
                age = max(current.info.age_s, time.monotonic() - seen[1])
                if age > current.info.ttl_s:
                    self._took(self._store.replace(self._record(0), current.version),
                               f"taken over from {current.info.describe()}, not renewed for {age:.0f} s")
                    return self
            except storage.Conflict:
                conflicts += 1  # another writer moved between our read and our write: read again
                if conflicts < _MAX_CONFLICTS:
                    continue
            now = time.monotonic()
            if now >= deadline:
                raise LeaseHeld(self._held_message(current))
            time.sleep(min(poll, deadline - now))

    def _took(self, version: str, how: str) -> None:
        self._version, self._renewals, self._renewed_at = version, 0, time.monotonic()
        log.log(logging.WARNING if how.startswith("taken") else logging.INFO, "writer lease %s: %s (ttl %g s)",
                storage.redact(self.url), how, self.ttl_s)
        if self.heartbeat:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="writer-lease", daemon=True)
            self._thread.start()

    def _held_message(self, current: _Read | None) -> str:
        where = storage.redact(self.output_url)
        if current is None:
            return f"{where}: the writer lease kept changing hands; try again"
        info = current.info
        return (f"{where} is being written by {info.describe()}, lease renewed {info.age_s:.0f} s ago; "
                f"wait for it to finish, or if that process is dead its lease expires {info.ttl_s:g} s after its "
                f"last renewal (delete {storage.redact(self.url)} only if you are sure it is dead)")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours; a failure only logs."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.ttl_s)
        with self._lock:
            if self._version is None:
                return
            version, self._version = self._version, None
            if self._lost:
                return
            try:
                try:
                    self._store.delete(version)
                except storage.Conflict:  # a renewal of ours landed though its reply was lost
                    current = self._store.read()
                    if current is not None and current.record["owner"].get("id") == self.owner["id"]:
                        self._store.delete(current.version)
            except storage.StorageError as err:
                log.warning("could not delete the writer lease (it expires %g s after its last renewal): %s",
                            self.ttl_s, err)

    def __enter__(self) -> WriterLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # Keeping it
    def _record(self, renewals: int) -> dict[str, Any]:
        now = time.time()
        return {"owner": self.owner, "ttl_s": self.ttl_s, "renewals": renewals, "renewed": now,
                "renewed_utc": _utc(now)}

    def renew(self) -> None:
        """Rewrite the lease now (the heartbeat does this every ttl/3); LeaseLost if it is not ours."""
        with self._lock:
            if self._lost:
                raise LeaseLost(self._lost)
            if self._version is None:
                raise LeaseError(f"the writer lease of {storage.redact(self.output_url)} is not held")
            started = time.monotonic()
            record = self._record(self._renewals + 1)
            try:
                self._version = self._store.replace(record, self._version)
            except storage.Conflict:
                current = self._store.read()
                mine = current is not None and current.record["owner"].get("id") == self.owner["id"]
                if not (mine and current.record.get("renewals") == record["renewals"]):
                    self._lost = _lost_message(self.output_url, current)
                    log.error("%s", self._lost)
                    raise LeaseLost(self._lost) from None
                self._version = current.version  # our write landed; its retry found it already applied
            self._renewals += 1
            self._renewed_at = started

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseError:
                return
            except storage.StorageError as err:  # transient: check() stops the stage if it lasts
                log.warning("could not renew the writer lease %s: %s", storage.redact(self.url), err)

    @property
    def held(self) -> bool:
        """True while the lease is ours and was renewed within its ttl."""
        return (self._version is not None and not self._lost
                and time.monotonic() - self._renewed_at < self.ttl_s)

    def check(self) -> None:
        """Raise LeaseLost unless the lease is ours with at least ttl/2 to run; call before each commit."""
        if self._lost:
            raise LeaseLost(self._lost)
        if self._version is None:
            raise LeaseError(f"the writer lease of {storage.redact(self.output_url)} is not held")
        if time.monotonic() - self._renewed_at > self.ttl_s / 2:
            try:
                self.renew()
            except storage.StorageError as err:
                raise LeaseLost(f"the writer lease of {storage.redact(self.output_url)} could not be renewed for "
                                f"{time.monotonic() - self._renewed_at:.0f} s ({err}); stop before committing") \
                    from None

    def token(self) -> LeaseToken:
        """What another process needs to check this lease (LeaseToken.check)."""
        return LeaseToken(self.output_url, self.owner["id"])


def stage_lease(output_url: str, cluster: Any, storage_options: dict | None = None) -> WriterLease:
    """The writer lease of a stage's output folder, timed by the config's cluster section
    (jobs.config.ClusterConfig: lease_ttl_s, lease_wait_s)."""
    return WriterLease(output_url, storage_options, ttl_s=cluster.lease_ttl_s, wait_s=cluster.lease_wait_s)

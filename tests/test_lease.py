"""Writer leases between real processes, on a local disk and on S3 (moto on loopback)."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipelines.core import lease as L
from pipelines.core import storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = "sar encode --config demo.yaml"

# A writer process: one WriterLease, driven by one command per line on stdin, one reply line each.
WRITER = r"""
import json, sys
from pipelines.core.lease import LeaseError, WriterLease
url, options, ttl, command = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
lease = None
print("ready", flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    try:
        if cmd == "acquire":
            lease = WriterLease(url, options, ttl_s=ttl, wait_s=float(args[0]), command=command).acquire()
            reply = "acquired"
        elif cmd == "check":
            lease.check()
            reply = "held"
        elif cmd == "release":
            lease.release()
            reply = "released"
    except LeaseError as err:
        reply = f"{type(err).__name__} {err}"
    print(reply, flush=True)
"""


class Writer:
    """A child process holding (or trying to hold) the lease of `url`."""

    def __init__(self, url: str, options: dict, ttl_s: float):
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, url, json.dumps(options), str(ttl_s), COMMAND],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        self.pid = self.proc.pid
        self.replies: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.replies.put(line.strip())

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float = 30.0) -> str:
        try:
            return self.replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"writer {self.pid}: no reply within {timeout} s (exit {self.proc.poll()})") from None

    def ask(self, command: str, timeout: float = 30.0) -> str:
        self.send(command)
        return self.reply(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def atomic_s3(s3_server):
    """moto's S3 answering one request at a time, on loopback; returns its endpoint.

    moto evaluates IfMatch / IfNoneMatch and then writes in two steps on concurrent server
    threads, so two racing conditional writes could both pass there; S3 makes each one
    atomic, and serialising requests does the same. The backend (buckets, objects) is
    moto's in-process one, shared with `s3_server`.
    """
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app, lock = DomainDispatcherApplication(create_backend_app), threading.Lock()

    def one_at_a_time(environ, start_response):
        with lock:
            return list(app(environ, start_response))

    server = make_server("127.0.0.1", 0, one_at_a_time, threaded=True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture(params=["local", "s3"])
def target(request, tmp_path):
    """(output URL, storage_options) of an empty output folder."""
    if request.param == "local":
        return str(tmp_path / "out"), {}
    endpoint = request.getfixturevalue("atomic_s3")
    return request.getfixturevalue("s3_bucket") + "/run/latents", {"endpoint_url": endpoint}


@pytest.fixture
def writers(target):
    """Start n writer processes on the target; they are killed at the end of the test."""
    started: list[Writer] = []

    def start(n: int, ttl_s: float) -> list[Writer]:
        new = [Writer(*target, ttl_s) for _ in range(n)]
        started.extend(new)
        for w in new:
            assert w.reply() == "ready"
        return new

    yield start
    for w in started:
        w.close()


def owner_pid(target) -> int | None:
    info = L.lease_status(*target)
    return None if info is None else info.owner["pid"]


def wait_until_expired(target, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not L.lease_status(*target).expired:
        assert time.monotonic() < deadline, "the lease never expired"
        time.sleep(0.1)


def test_second_writer_refuses_naming_the_owner_then_waits_for_release(target, writers):
    a, b = writers(2, ttl_s=30)
    assert a.ask("acquire 0") == "acquired"
    refused = b.ask("acquire 0")
    assert refused.startswith("LeaseHeld "), refused
    for part in (f"host {socket.gethostname()}", f"pid {a.pid}", "since 20", COMMAND, L.LEASE_FILE):
        assert part in refused, (part, refused)
    assert owner_pid(target) == a.pid

    b.send("acquire 20")
    with pytest.raises(queue.Empty):
        b.replies.get(timeout=1.0)  # still waiting: the owner is alive
    released = time.monotonic()
    assert a.ask("release") == "released"
    assert b.reply() == "acquired"
    assert time.monotonic() - released < 10  # the release let it in, not the 30 s ttl
    assert owner_pid(target) == b.pid
    assert b.ask("release") == "released"
    assert L.lease_status(*target) is None
    # Nothing of the lease stays in the output folder.
    assert [n for n in storage.listdir(target[0], target[1]) if n.startswith(L.LEASE_PREFIX)] == []


def test_an_owner_killed_on_this_host_is_taken_over_at_once(target, writers):
    """kill -9 (or the OOM killer): the relaunch on the same host takes the lease without waiting out
    the ttl, since the holder's pid is gone; on S3 as on a local disk."""
    a, b = writers(2, ttl_s=60)
    assert a.ask("acquire 0") == "acquired"
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(timeout=10)
    info = L.lease_status(*target)  # dead, renewed less than the ttl ago: not expired
    assert info is not None and not info.expired and f"pid {a.pid}" in info.describe()
    started = time.monotonic()
    assert b.ask("acquire 0") == "acquired"  # no waiting at all
    assert time.monotonic() - started < 30  # far from the 60 s ttl, whatever the machine's load
    assert owner_pid(target) == b.pid
    assert b.ask("check") == "held"


def _foreign_lease(folder, **owner) -> None:
    """A lease written by hand in `folder`, renewed just now, by `owner` (host, pid, machine, started)."""
    now = time.time()
    record = {"owner": {"id": "someone", "since": L._utc(now), "command": "sar encode", **owner}, "ttl_s": 60.0,
              "renewals": 0, "renewed": now, "renewed_utc": L._utc(now)}
    L._LocalStore(str(folder)).create(record)


def test_a_dead_holder_on_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
    here = {"host": socket.gethostname(), "machine": L._machine()}
    with open("/proc/sys/kernel/pid_max") as f:
        never = int(f.read()) + 1  # a pid no process can have
    for folder, owner, why in [
        (tmp_path / "gone", {"pid": never, "started": 1.0}, f"pid {never} is not running on this host"),
        (tmp_path / "reused", {"pid": os.getpid(), "started": 1.0}, f"pid {os.getpid()} is another process now"),
    ]:
        _foreign_lease(folder, **here, **owner)
        with caplog.at_level("WARNING", logger=L.__name__):
            with L.WriterLease(str(folder), ttl_s=60, wait_s=0) as lease:
                assert lease.held and L.lease_status(str(folder)).owner["pid"] == os.getpid()
        assert f"taken over from host {here['host']} pid {owner['pid']}" in caplog.text and why in caplog.text


def test_a_holder_elsewhere_or_alive_keeps_its_lease_until_the_ttl(tmp_path):
    here = {"host": socket.gethostname(), "machine": L._machine()}
    with open("/proc/sys/kernel/pid_max") as f:
        never = int(f.read()) + 1
    for name, owner in [
        ("other host", {"host": "another-host", "machine": here["machine"], "pid": never, "started": 1.0}),
        ("other machine, same name", {**here, "machine": "another-boot/pid:[1]", "pid": never, "started": 1.0}),
        ("an older release's lease", {**here, "pid": never}),  # no start time recorded
        ("alive", {**here, "pid": os.getpid(), "started": L._started(os.getpid())}),
    ]:
        folder = tmp_path / name.replace(" ", "-")
        _foreign_lease(folder, **owner)
        with pytest.raises(L.LeaseHeld, match="is being written by"):
            L.WriterLease(str(folder), ttl_s=60, wait_s=0).acquire()


def test_stopped_owner_learns_it_lost_the_lease(target, writers):
    a, b = writers(2, ttl_s=2)
    assert a.ask("acquire 0") == "acquired"
    os.kill(a.pid, signal.SIGSTOP)  # heartbeat frozen, as in a long pause or a partition
    try:
        assert b.ask("acquire 15") == "acquired"
    finally:
        os.kill(a.pid, signal.SIGCONT)
    lost = a.ask("check")
    assert lost.startswith("LeaseLost ") and f"pid {b.pid}" in lost, lost
    assert a.ask("release") == "released"
    assert owner_pid(target) == b.pid  # the old owner's release left the new lease alone
    assert b.ask("check") == "held"


def test_racing_takers_of_an_expired_lease_exactly_one_wins(target, writers):
    b, c = writers(2, ttl_s=30)
    for _ in range(3):
        # An owner that stopped renewing (no heartbeat), its lease now expired.
        stale = L.WriterLease(*target, ttl_s=0.2, heartbeat=False, command="stale").acquire()
        wait_until_expired(target)
        b.send("acquire 0")
        c.send("acquire 0")
        replies = {w.pid: w.reply() for w in (b, c)}
        winners = [w for w in (b, c) if replies[w.pid] == "acquired"]
        assert len(winners) == 1, replies
        winner = winners[0]
        loser = c if winner is b else b
        assert replies[loser.pid].startswith("LeaseHeld ") and f"pid {winner.pid}" in replies[loser.pid], replies
        assert owner_pid(target) == winner.pid
        with pytest.raises(L.LeaseLost, match=f"pid {winner.pid}"):
            stale.check()
        assert winner.ask("release") == "released"


def test_token_checks_the_lease_from_another_holder(target):
    first = L.WriterLease(*target, ttl_s=2, heartbeat=False).acquire()
    token = first.token()
    token.check(target[1])
    assert first.held
    wait_until_expired(target)
    with pytest.raises(L.LeaseLost, match="not renewed"):
        token.check(target[1])
    with L.WriterLease(*target, ttl_s=30) as second:
        with pytest.raises(L.LeaseLost, match=f"pid {os.getpid()}"):
            token.check(target[1])
        second.token().check(target[1])
        with pytest.raises(L.LeaseLost):
            first.check()
        assert not first.held and second.held
    assert L.lease_status(*target) is None


def test_other_protocols_are_refused():
    with pytest.raises(L.LeaseUnsupported, match="local path or s3://"):
        L.WriterLease("memory://bucket/out")


def test_an_unreadable_lease_file_is_named(tmp_path):
    (tmp_path / L.LEASE_FILE).write_text("not json")
    with pytest.raises(storage.StorageError, match=f"{L.LEASE_FILE} is not a writer lease"):
        L.WriterLease(str(tmp_path)).acquire()

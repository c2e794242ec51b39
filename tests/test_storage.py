import os

import pyarrow.fs as pafs
import pytest

from pipelines.core import storage
from tests.conftest import free_port


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_round_trip_write_list_read(base):
    storage.write_json(storage.join(base, "a", "x.json"), {"v": 1})
    storage.write_bytes(storage.join(base, "a", "y.bin"), b"\x00\x01")
    assert storage.listdir(storage.join(base, "a")) == ["x.json", "y.bin"]
    assert storage.read_json(storage.join(base, "a", "x.json")) == {"v": 1}
    assert storage.read_bytes(storage.join(base, "a", "y.bin")) == b"\x00\x01"
    assert storage.exists(storage.join(base, "a", "x.json"))


def test_atomic_overwrite_keeps_old_content_on_failure(base):
    url = storage.join(base, "m.json")
    storage.write_json(url, {"gen": 1})
    with pytest.raises(RuntimeError):
        with storage.open_atomic(url, "wb") as f:
            f.write(b'{"gen": 2, "trunc')
            raise RuntimeError("crash mid-write")
    assert storage.read_json(url) == {"gen": 1}
    storage.write_json(url, {"gen": 2})
    assert storage.read_json(url) == {"gen": 2}
    # No temporary files are left beside the target.
    assert storage.listdir(base) == ["m.json"]


def test_missing_object_gives_clear_error(base):
    url = storage.join(base, "nope", "missing.json")
    with pytest.raises(storage.NotFound, match="missing.json"):
        storage.read_bytes(url)
    assert storage.listdir(storage.join(base, "nope")) == []


def test_invalid_json_names_the_file(base):
    url = storage.join(base, "bad.json")
    storage.write_text(url, "{not json")
    with pytest.raises(storage.StorageError, match="bad.json"):
        storage.read_json(url)


def test_pyarrow_filesystem_reads_what_storage_wrote(base):
    url = storage.join(base, "t", "f.txt")
    storage.write_text(url, "hello")
    fs, path = storage.pyarrow_filesystem(url)
    with fs.open_input_stream(path) as f:
        assert f.read() == b"hello"
    assert isinstance(fs, pafs.LocalFileSystem) == storage.is_local(base)


def test_download_dir_and_local_copy(base, tmp_path):
    storage.write_bytes(storage.join(base, "ckpt", "model.pt"), b"m")
    storage.write_bytes(storage.join(base, "ckpt", "sub", "opt.pt"), b"o")
    back = tmp_path / "back"
    storage.download_dir(storage.join(base, "ckpt"), str(back))
    assert (back / "model.pt").read_bytes() == b"m" and (back / "sub" / "opt.pt").read_bytes() == b"o"
    local = storage.local_copy(storage.join(base, "ckpt", "model.pt"))
    assert open(local, "rb").read() == b"m"


def test_credentials_never_in_redacted_urls():
    assert storage.redact("s3://AKIA:secret@bucket/key") == "s3://bucket/key"
    assert storage.redact("/local/path") == "/local/path"


def test_storage_options_reach_s3fs(s3_bucket, s3_server, monkeypatch):
    # With the environment's credentials removed, explicit storage_options still work.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    opts = {"key": "testing", "secret": "testing-secret", "endpoint_url": s3_server, "skip_instance_cache": True}
    storage.write_json(f"{s3_bucket}/o.json", {"ok": True}, storage_options=opts)
    assert storage.read_json(f"{s3_bucket}/o.json", storage_options=opts) == {"ok": True}


def test_a_file_another_process_wrote_is_seen_after_a_listing(s3_bucket, s3_server):
    """s3fs answers from its cached listing of a folder; a file another process (a Train worker, another
    node) wrote after that listing must still exist for this one, and be listed."""
    import boto3

    folder = f"{s3_bucket}/stage"
    storage.write_json(f"{folder}/a.json", {"n": 1})
    assert storage.listdir(folder) == ["a.json"] and not storage.exists(f"{folder}/metrics.jsonl")  # cached
    bucket = s3_bucket.removeprefix("s3://")
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=bucket, Key="stage/metrics.jsonl", Body=b"{}\n")
    assert storage.exists(f"{folder}/metrics.jsonl")
    assert storage.listdir(folder) == ["a.json", "metrics.jsonl"]


# One-line errors from the object store -------------------------------------------------------
SECRET = "testing-secret"  # the conftest's AWS_SECRET_ACCESS_KEY


def assert_one_line(err: BaseException, url: str, *secrets: str) -> str:
    """The message is one line naming the URL, with no secret, and prints without a chain."""
    text = str(err)
    assert "\n" not in text and len(text) < 600, text
    assert url in text, text
    for secret in (SECRET, *secrets):
        assert secret not in text, text
    assert err.__cause__ is None and err.__suppress_context__, "the traceback would show the client's chain"
    return text


def test_missing_bucket_is_one_line(s3_server):
    url = "s3://no-such-bucket-here/latents/_manifest.json"
    for op in (lambda: storage.read_bytes(url), lambda: storage.write_json(url, {}),
               lambda: storage.listdir("s3://no-such-bucket-here/latents")):
        with pytest.raises(storage.BucketNotFound) as info:
            op()
        text = assert_one_line(info.value, "s3://no-such-bucket-here")
        assert "'no-such-bucket-here' does not exist" in text
        assert not isinstance(info.value, storage.NotFound)  # a missing bucket is not "no file yet"


def test_access_denied_and_rejected_credentials(s3_bucket, monkeypatch):
    import boto3
    from moto import settings as moto_settings

    iam = boto3.client("iam")
    user = f"reader-{os.urandom(4).hex()}"
    iam.create_user(UserName=user)  # no policy attached: every S3 action is denied
    key = iam.create_access_key(UserName=user)["AccessKey"]
    # moto checks signatures and IAM policies only when told to (the server shares this process).
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    url = f"{s3_bucket}/x.json"
    denied = {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"], "skip_instance_cache": True}
    with pytest.raises(storage.AccessDenied) as info:
        storage.write_json(url, {"v": 1}, denied)
    assert "access denied (403 AccessDenied)" in assert_one_line(info.value, url, key["SecretAccessKey"])
    assert isinstance(info.value, PermissionError)

    wrong = {"key": "AKIANOTAREALKEY00000", "secret": "not-the-right-secret", "skip_instance_cache": True}
    with pytest.raises(storage.AccessDenied) as info:
        storage.listdir(s3_bucket, wrong)
    assert "credentials rejected (InvalidAccessKeyId)" in assert_one_line(info.value, s3_bucket,
                                                                           "not-the-right-secret")


def test_no_credentials_names_the_field(s3_bucket, monkeypatch, tmp_path):
    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "missing-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "missing-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would still hold the old credentials
    url = f"{s3_bucket}/imagenet"
    with pytest.raises(storage.NoCredentials) as info:
        with storage.field("data.source"):
            storage.listdir(url)
    assert assert_one_line(info.value, url) == \
        f"data.source {url}: no credentials found (set AWS_* or data.storage_options)"
    s3fs.S3FileSystem.clear_instance_cache()


def test_the_innermost_field_names_an_error(tmp_path):
    url = str(tmp_path / "nowhere.json")
    with pytest.raises(storage.NotFound) as info:
        with storage.field("run_dir"), storage.field("data.source"):
            storage.read_json(url)
    assert str(info.value) == f"data.source not found: {url}" and info.value.field == "data.source"



def test_unreachable_endpoint_is_named(s3_server):
    import time

    port = free_port()
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": SECRET,
            "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 2}}, "retries": 1,
            "skip_instance_cache": True}
    url = "s3://some-bucket/latents/_manifest.json"
    start = time.monotonic()
    with pytest.raises(storage.Unreachable) as info:
        storage.read_json(url, opts)
    text = assert_one_line(info.value, url)
    assert f"http://127.0.0.1:{port}" in text and info.value.transient
    assert time.monotonic() - start < 10


class FakeS3:
    """A loopback HTTP server that answers `throttle` requests with 503 SlowDown, then serves `body`."""

    SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message></Error>")

    def __init__(self, throttle: int, body: bytes = b"hello"):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        fake = self
        self.requests, self.throttled, self.throttle, self.body = 0, 0, throttle, body

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self, head=False):
                fake.requests += 1
                if fake.throttled < fake.throttle:
                    fake.throttled += 1
                    self._reply(503, fake.SLOW_DOWN, {"Content-Type": "application/xml"}, head)
                else:
                    self._reply(200, fake.body, {"Content-Type": "application/octet-stream", "ETag": '"e"',
                                                 "Last-Modified": "Mon, 02 Nov 2026 10:00:00 GMT"}, head)

            def do_HEAD(self):
                self.do_GET(head=True)

            def _reply(self, status, body, headers, head):
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def options(self, max_attempts: int) -> dict:
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": SECRET, "skip_instance_cache": True,
                "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": max_attempts}}, "retries": 1}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_throttling_is_retried_by_botocore():
    fake = FakeS3(throttle=1)
    try:
        assert storage.read_bytes("s3://bucket/key", fake.options(max_attempts=2)) == b"hello"
        assert fake.throttled == 1 and fake.requests > 1  # one 503, then botocore's retry got through
    finally:
        fake.close()


def test_persistent_throttling_is_one_line():
    fake = FakeS3(throttle=10**6)
    try:
        with pytest.raises(storage.Throttled) as info:
            storage.read_bytes("s3://bucket/key", fake.options(max_attempts=2))
        text = assert_one_line(info.value, "s3://bucket/key")
        assert "throttling requests" in text and "503" in text and "2 attempts" in text and info.value.transient
        assert fake.requests == 2  # botocore total_max_attempts, and s3fs's own retries=1 added none
    finally:
        fake.close()


def test_retry_defaults_fill_only_what_is_unset(monkeypatch):
    import pickle

    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    opts = storage.s3_options({"config_kwargs": {"connect_timeout": 3}})
    assert opts["config_kwargs"] == {"connect_timeout": 3, "retries": storage.S3_RETRIES}
    assert opts["retries"] == storage.S3FS_RETRIES
    mine = {"config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 9}}, "retries": 4}
    assert storage.s3_options(mine) == mine
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")  # botocore reads the environment itself
    assert "config_kwargs" not in storage.s3_options({})
    monkeypatch.delenv("AWS_RETRY_MODE")

    # Ray Data gets the same filesystem, and Ray ships it to workers by pickling.
    fs, _ = storage.filesystem("s3://bucket/x", {"endpoint_url": "http://127.0.0.1:1"})
    pa_fs, path = storage.pyarrow_filesystem("s3://bucket/x", {"endpoint_url": "http://127.0.0.1:1"})
    assert path == "bucket/x"
    for inner in (fs, pa_fs.handler.fs, pickle.loads(pickle.dumps(pa_fs)).handler.fs):
        assert inner.config_kwargs["retries"] == storage.S3_RETRIES
        assert inner.retries == storage.S3FS_RETRIES


def test_local_failures_are_one_line(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(storage.StorageError, match="is a folder"):
        storage.read_bytes(str(tmp_path / "folder"))
    (tmp_path / "afile").write_bytes(b"")
    below = str(tmp_path / "afile" / "below")  # a file stands where the folder should be
    with pytest.raises(storage.StorageError) as info:
        storage.write_bytes(below, b"x")
    assert_one_line(info.value, below)


def test_local_outputs_get_the_mode_a_plain_open_would_give(tmp_path):
    url = str(tmp_path / "out.json")
    storage.write_json(url, {"v": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(url).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600: others can read results

import json
import os

import pyarrow.fs as pafs
import pytest

from pipelines import storage


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
    assert [os.path.basename(u) for u in storage.glob(storage.join(base, "a", "*.json"))] == ["x.json"]
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


def test_dirs_up_and_down(base, tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "model.pt").write_bytes(b"m")
    (src / "sub" / "opt.pt").write_bytes(b"o")
    storage.upload_dir(str(src), storage.join(base, "ckpt"))
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

"""The one way every stage reads and writes: local paths, s3:// and any fsspec protocol.

A location is a URL string (`/data/x`, `s3://bucket/x`, `gs://...`, `memory://...`).
Object-store endpoints and credentials come from the standard environment
(`AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, profiles, workload identity) or from the
config's `data.storage_options`; they are never logged or written into outputs.

Writes are atomic: a local file is written under a temporary name in its own folder and
renamed over the target; an object-store object is uploaded in one PUT (or one completed
multipart upload), which the store makes visible whole or not at all. Readers therefore
never see a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from typing import Any, Iterator

import fsspec
import pyarrow.fs as pafs
from fsspec.core import url_to_fs


class StorageError(OSError):
    """A storage operation failed; the message names the location."""


class NotFound(StorageError, FileNotFoundError):
    """The location does not exist."""


_CRED_IN_URL = re.compile(r"^([a-z0-9+.-]+://)[^/@]*@", re.IGNORECASE)


def redact(url: str) -> str:
    """The URL with any user:secret@ part removed, for logs and outputs."""
    return _CRED_IN_URL.sub(r"\1", str(url))


def is_local(url: str) -> bool:
    return "://" not in str(url) or str(url).startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join path components onto a local path or URL."""
    base = str(base)
    if is_local(base) and not base.startswith("file://"):
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it."""
    try:
        return url_to_fs(str(url), **(storage_options or {}))
    except (ImportError, ValueError) as err:
        raise StorageError(f"cannot open {redact(url)}: {err}") from None


def protocol_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL of `path` on `fs` (`s3://b/k` for s3fs, the plain path for local)."""
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if proto in ("file", "local") else f"{proto}://{path}"


def pyarrow_filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for Ray Data / Ray Train, and the path inside it.

    Local paths get pyarrow's LocalFileSystem; everything else goes through the same
    fsspec filesystem the rest of the project uses (so one set of credentials and one
    endpoint apply everywhere), wrapped by pyarrow's FSSpecHandler.
    """
    if is_local(url):
        path = str(url).removeprefix("file://")
        return pafs.LocalFileSystem(), os.path.abspath(path)
    fs, path = filesystem(url, storage_options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def makedirs(url: str, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    fs.makedirs(path, exist_ok=True)


def listdir(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names (not paths) directly under `url`, sorted; [] when it does not exist."""
    fs, path = filesystem(url, storage_options)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def glob(url_pattern: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """URLs matching a glob pattern, sorted."""
    fs, pattern = filesystem(url_pattern, storage_options)
    return sorted(protocol_url(fs, p) for p in fs.glob(pattern))


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise NotFound(f"not found: {redact(url)}") from None
    except IsADirectoryError:
        raise StorageError(f"is a folder, not a file: {redact(url)}") from None


def read_text(url: str, storage_options: dict[str, Any] | None = None) -> str:
    return read_bytes(url, storage_options).decode()


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    data = read_bytes(url, storage_options)
    try:
        return json.loads(data)
    except json.JSONDecodeError as err:
        raise StorageError(f"{redact(url)}: not valid JSON ({err.msg} at line {err.lineno})") from None


@contextlib.contextmanager
def open_atomic(url: str, mode: str = "wb", storage_options: dict[str, Any] | None = None) -> Iterator[Any]:
    """Open `url` for writing; the target appears only when the block exits cleanly."""
    if mode not in ("wb", "w"):
        raise ValueError(f"open_atomic writes only ('w' or 'wb'), got {mode!r}")
    fs, path = filesystem(url, storage_options)
    if is_local(url):
        folder = os.path.dirname(os.path.abspath(path)) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return
    # Object store: stage locally, then one upload; the object appears whole or not at all.
    with tempfile.TemporaryDirectory(prefix="sar-upload-") as staging:
        tmp = os.path.join(staging, uuid.uuid4().hex)
        with open(tmp, mode) as f:
            yield f
        try:
            fs.put_file(tmp, path)
        except Exception as err:  # the store's error, re-raised with the location named
            raise StorageError(f"upload to {redact(url)} failed: {err}") from err


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    with open_atomic(url, "wb", storage_options) as f:
        f.write(data)


def write_text(url: str, text: str, storage_options: dict[str, Any] | None = None) -> None:
    write_bytes(url, text.encode(), storage_options)


def write_json(url: str, obj: Any, storage_options: dict[str, Any] | None = None) -> None:
    write_text(url, json.dumps(obj, indent=2, sort_keys=True) + "\n", storage_options)


def remove(url: str, recursive: bool = False, storage_options: dict[str, Any] | None = None) -> None:
    """Delete a file or (with recursive) a folder; missing is not an error."""
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def upload_dir(local_dir: str, url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Copy a local folder's files to `url` (used for checkpoints and sample shards)."""
    fs, path = filesystem(url, storage_options)
    for root, _, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            dst = posixpath.join(path, rel) if not is_local(url) else os.path.join(path, rel)
            if is_local(url):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
            fs.put_file(src, dst)


def download_dir(url: str, local_dir: str, storage_options: dict[str, Any] | None = None) -> None:
    """Copy the files under `url` into a local folder."""
    fs, path = filesystem(url, storage_options)
    if not fs.exists(path):
        raise NotFound(f"not found: {redact(url)}")
    fs.get(path.rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)


def sha256_file(path: str) -> str:
    """sha256 of a local file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def local_copy(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """A local path holding `url`'s content: the path itself when local, else a cached copy."""
    if is_local(url):
        path = str(url).removeprefix("file://")
        if not os.path.exists(path):
            raise NotFound(f"not found: {path}")
        return path
    fs, path = filesystem(url, storage_options)
    if not fs.exists(path):
        raise NotFound(f"not found: {redact(url)}")
    cache = os.path.join(tempfile.gettempdir(), "sar-cache", uuid.uuid5(uuid.NAMESPACE_URL, redact(url)).hex)
    target = os.path.join(cache, posixpath.basename(path.rstrip("/")))
    if not os.path.exists(target):
        os.makedirs(cache, exist_ok=True)
        staging = tempfile.mkdtemp(dir=cache)
        dst = os.path.join(staging, posixpath.basename(path.rstrip("/")))
        if fs.isdir(path):
            fs.get(path.rstrip("/") + "/", dst + "/", recursive=True)
        else:
            fs.get_file(path, dst)
        try:
            os.replace(dst, target)
        except OSError:  # another process on this node finished the same copy first
            if not os.path.exists(target):
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target

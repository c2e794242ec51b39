"""The one way every stage reads and writes: local paths, s3:// and any fsspec protocol.

A location is a URL string (`/data/x`, `s3://bucket/x`, `gs://...`, `memory://...`).
Object-store endpoints and credentials come from the standard environment
(`AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, profiles, workload identity) or from the
config's `data.storage_options`; they are never logged or written into outputs.

Writes are atomic: a local file is written under a temporary name in its own folder and
renamed over the target; an object-store object is uploaded in one PUT (or one completed
multipart upload), which the store makes visible whole or not at all. Readers therefore
never see a half-written file.

Failures come out as one line. Every public function turns what the store or the client
raised (s3fs's OSErrors, botocore's ClientError / NoCredentialsError / connection errors)
into a StorageError subclass whose message names the URL, the cause and the remedy, and
never a credential:

    NotFound         the object (or local file) does not exist
    BucketNotFound   the bucket does not exist
    NoCredentials    no credentials anywhere botocore looks
    AccessDenied     403: the credentials lack permission, or the store rejects them
    Unreachable      the endpoint did not answer (transient)
    Throttled        503 SlowDown / throttling outlasted every retry (transient)
    Conflict         a conditional write found the object changed (412) or raced one (409)
    StorageError     anything else, summarised

`with storage.field("data.source"): ...` prefixes those messages with the config field a
URL came from. Code that drives an fsspec filesystem itself wraps its calls in
`translate_errors(url)` (or classifies per-file errors with `classify`).

Transient object-store errors are retried by botocore's own retry machinery, with
backoff (S3_RETRIES, applied unless the storage_options or AWS_RETRY_MODE /
AWS_MAX_ATTEMPTS say otherwise), and by s3fs's wrapper around each call (S3FS_RETRIES,
storage_options `retries`), which also covers errors botocore cannot retry (a body read cut
short, an unparsable throttling reply). Ray Data gets the same filesystem, so the same
retries, through `pyarrow_filesystem`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import posixpath
import re
import shutil
import sys
import tempfile
import threading
import uuid
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import urlsplit

import fsspec
from fsspec.core import split_protocol, url_to_fs

if TYPE_CHECKING:
    import pyarrow.fs as pafs

# botocore's retry settings for S3 (botocore.config.Config(retries=...)). "adaptive" is
# "standard" (exponential backoff with jitter on throttling, 5xx and connection errors)
# plus a client-side rate limiter that slows a client down while the store throttles it,
# which is what many Ray workers writing to one prefix need.
S3_RETRIES = {"mode": "adaptive", "total_max_attempts": 6}
# s3fs's own attempts around each call, on top of botocore's. s3fs nests this wrapper for
# whole-object reads, so a read makes up to S3FS_RETRIES**2 * total_max_attempts requests.
S3FS_RETRIES = 2


class StorageError(OSError):
    """A storage operation failed; the message (one line) names the location."""

    transient = False  # True when trying again later may succeed
    field: str | None = None  # the config field the URL came from, once `field()` named it

    def __init__(self, message: str, url: str | None = None):
        super().__init__(message)
        self.url = url


class NotFound(StorageError, FileNotFoundError):
    """The location does not exist."""


class BucketNotFound(StorageError):
    """The bucket of an object-store URL does not exist."""


class NoCredentials(StorageError):
    """No object-store credentials were found."""


class AccessDenied(StorageError, PermissionError):
    """The store refused the request (403): missing permission or rejected credentials."""


class Unreachable(StorageError, ConnectionError):
    """The object-store endpoint did not answer."""

    transient = True


class Throttled(StorageError):
    """The store kept throttling (503 SlowDown) after every retry."""

    transient = True


class Conflict(StorageError):
    """A conditional write or delete lost: the object changed (412) or a concurrent one won (409)."""


_CRED_IN_URL = re.compile(r"^([a-z0-9+.-]+://)[^/@]*@", re.IGNORECASE)
_S3_PROTOCOLS = ("s3", "s3a")
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                     "TokenRefreshRequired", "InvalidClientTokenId", "AuthorizationHeaderMalformed"}
_THROTTLING_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                     "TooManyRequestsException", "ProvisionedThroughputExceededException",
                     "RequestThrottled", "ServiceUnavailable", "503"}
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")
_SECRET_OPTION = re.compile(r"secret|token|password|key", re.IGNORECASE)
_UMASK = os.umask(0o022)  # read the process's umask (os.umask sets it), then restore it
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
MAX_MESSAGE = 400  # characters of a store's own message kept in ours


def redact(url: str) -> str:
    """The URL with any user:secret@ part removed, for logs and outputs."""
    return _CRED_IN_URL.sub(r"\1", str(url))


# One-line errors ---------------------------------------------------------------------------
def classify(err: BaseException, url: str, storage_options: dict[str, Any] | None = None) -> StorageError | None:
    """`err` as a one-line StorageError about `url`, or None when it is not a storage failure."""
    if isinstance(err, StorageError):
        return err
    # No botocore error can exist unless botocore was imported (local paths never import it).
    if "botocore.exceptions" in sys.modules:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            CredentialRetrievalError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
        )
    else:
        BotoCoreError = ClientError = BotoConnectionError = CredentialRetrievalError = type("_Absent", (Exception,), {})
        NoCredentialsError = PartialCredentialsError = ReadTimeoutError = BotoCoreError
    where = redact(url)
    # s3fs re-raises the ClientError as an OSError (its __cause__); look through the chain.
    chain, seen = [], err
    while seen is not None and len(chain) < 5:
        chain.append(seen)
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    client = next((e for e in chain if isinstance(e, ClientError)), None)
    boto = next((e for e in chain if isinstance(e, BotoCoreError)), None)

    def made(cls: type[StorageError], text: str) -> StorageError:
        return cls(_scrub(f"{where}: {text}", storage_options), where)

    if client is not None:
        error = client.response.get("Error", {})
        meta = client.response.get("ResponseMetadata", {})
        code = str(error.get("Code") or meta.get("HTTPStatusCode") or "Unknown")
        status = meta.get("HTTPStatusCode")
        attempts = meta.get("RetryAttempts", 0) + 1
        said = _one_line(error.get("Message") or "")
        if code in ("NoSuchBucket",):
            return made(BucketNotFound, f"bucket {_bucket(url)!r} does not exist (create it, or fix the URL)")
        if code in ("NoSuchKey", "404") or status == 404:
            return NotFound(f"not found: {where}", where)
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return made(Conflict, f"changed by another writer ({_status(status, code)})")
        if code in _CREDENTIAL_CODES:
            return made(AccessDenied, f"credentials rejected ({code}); check AWS_ACCESS_KEY_ID / "
                                      "AWS_SECRET_ACCESS_KEY, the profile, or data.storage_options")
        if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
            return made(AccessDenied, f"access denied ({_status(403, code)}); the credentials in use lack permission "
                                      "for this bucket or key (check the IAM or bucket policy)")
        if code in _THROTTLING_CODES or status == 503:
            return made(Throttled, f"the store is throttling requests ({_status(status or 503, code)}) and {attempts} "
                                   "attempts did not get through; lower the request rate (fewer writers) "
                                   "or raise storage_options config_kwargs.retries.total_max_attempts")
        op = getattr(client, "operation_name", "request")
        return made(StorageError, f"{op} failed ({_status(status, code)}){': ' + said if said else ''}")
    if isinstance(boto, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
        return made(NoCredentials, "no credentials found (set AWS_* or data.storage_options)")
    if isinstance(boto, (BotoConnectionError, ReadTimeoutError)):
        endpoint = _endpoint(getattr(boto, "kwargs", {}).get("endpoint_url", ""))
        what = "timed out" if "Timeout" in type(boto).__name__ else "connection failed"
        return made(Unreachable, f"cannot reach the object store at {endpoint} ({what}, after retries); "
                                 "check the endpoint (AWS_ENDPOINT_URL_S3 or storage_options endpoint_url) "
                                 "and the network")
    if boto is not None:
        return made(StorageError, f"{type(boto).__name__}: {_one_line(str(boto))}")
    if not isinstance(err, OSError):  # torch re-raises a failed write as a RuntimeError over the OSError
        err = next((e for e in chain if isinstance(e, OSError)), err)
    if isinstance(err, FileNotFoundError):
        return NotFound(f"not found: {where}", where)
    if isinstance(err, IsADirectoryError):
        return StorageError(f"is a folder, not a file: {where}", where)
    if isinstance(err, PermissionError):
        return made(AccessDenied, f"permission denied ({_one_line(err.strerror or str(err))})")
    if isinstance(err, TimeoutError):  # fsspec's FSTimeoutError, asyncio's
        return made(Unreachable, "the store did not answer in time (after retries)")
    if isinstance(err, OSError):
        code = f" ({errno.errorcode[err.errno]})" if err.strerror and err.errno in errno.errorcode else ""
        return made(StorageError, (_one_line(err.strerror or str(err)) or type(err).__name__) + code)
    return None


@contextlib.contextmanager
def translate_errors(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[None]:
    """Re-raise storage failures inside the block as one-line StorageErrors about `url`."""
    try:
        yield
    except Exception as err:
        one_line = classify(err, url, storage_options)
        if one_line is None or one_line is err:
            raise
        raise one_line from None  # the original stays reachable as __context__


@contextlib.contextmanager
def field(name: str) -> Iterator[None]:
    """Prefix storage errors raised inside the block with the config field the URL came from.

    The innermost field wins: an error already named (a read of data.source inside a block
    about run_dir) keeps its field.
    """
    try:
        yield
    except StorageError as err:
        if err.field is None and err.args and isinstance(err.args[0], str):
            err.args = (f"{name} {err.args[0]}",)
            err.field = name
        raise


def _status(status: int | None, code: str) -> str:
    """`503 SlowDown`, or `HTTP 403` when the reply had no body to name a code (HEAD)."""
    if not status:
        return code
    return f"HTTP {status}" if code == str(status) else f"{status} {code}"


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


def _scrub(text: str, storage_options: dict[str, Any] | None) -> str:
    """`text` with every credential value in the environment or the options blanked out."""
    secrets = [os.environ.get(k, "") for k in _SECRET_ENV]
    stack = [storage_options or {}]
    while stack:
        for k, v in stack.pop().items():
            if isinstance(v, dict):
                stack.append(v)
            elif isinstance(v, str) and _SECRET_OPTION.search(str(k)):
                secrets.append(v)
    for secret in sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _bucket(url: str) -> str:
    return urlsplit(redact(url)).netloc or "?"


def _endpoint(url: str) -> str:
    parts = urlsplit(str(url))
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}" if parts.hostname \
        else "the default AWS endpoint"


# Filesystems -------------------------------------------------------------------------------
def is_local(url: str) -> bool:
    return "://" not in str(url) or str(url).startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join path components onto a local path or URL."""
    base = str(base)
    if is_local(base) and not base.startswith("file://"):
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def _s3_filesystem_class() -> type:
    """s3fs with its retry count as an option (so it survives pickling to Ray workers).

    Made on first use, so that local-only programs never import s3fs (a second or more).
    Pickle finds it as `pipelines.core.storage._S3FileSystem` through the module's __getattr__.
    """
    with _S3_CLASS_LOCK:
        if "_S3FileSystem" not in globals():
            import s3fs

            class _S3FileSystem(s3fs.S3FileSystem):
                def __init__(self, *args, retries: int | None = None, **kwargs):
                    super().__init__(*args, **kwargs)
                    if retries is not None:
                        self.retries = int(retries)

            _S3FileSystem.__qualname__ = "_S3FileSystem"
            # One instance cache for both, so S3FileSystem.clear_instance_cache() clears ours too.
            _S3FileSystem._cache = s3fs.S3FileSystem._cache
            globals()["_S3FileSystem"] = _S3FileSystem
        return globals()["_S3FileSystem"]


_S3_CLASS_LOCK = threading.Lock()


def __getattr__(name: str) -> Any:
    if name == "_S3FileSystem":
        return _s3_filesystem_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def s3_options(storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The storage_options with the retry defaults filled in where the user set none."""
    opts = dict(storage_options or {})
    config = dict(opts.get("config_kwargs") or {})
    if "retries" not in config and not (os.environ.get("AWS_RETRY_MODE") or os.environ.get("AWS_MAX_ATTEMPTS")):
        config["retries"] = dict(S3_RETRIES)
    if config:
        opts["config_kwargs"] = config
    opts.setdefault("retries", S3FS_RETRIES)
    return opts


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it."""
    url = str(url)
    with translate_errors(url, storage_options):
        try:
            protocol, _ = split_protocol(url)
            if protocol in _S3_PROTOCOLS and "::" not in url:
                fs = _s3_filesystem_class()(**s3_options(storage_options))
                return fs, fs._strip_protocol(url)
            return url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError, TypeError) as err:
            raise StorageError(f"cannot open {redact(url)}: {_one_line(str(err))}", redact(url)) from None


def protocol_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL of `path` on `fs` (`s3://b/k` for s3fs, the plain path for local)."""
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if proto in ("file", "local") else f"{proto}://{path}"


def pyarrow_filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for Ray Data / Ray Train, and the path inside it.

    Local paths get pyarrow's LocalFileSystem; everything else goes through the same
    fsspec filesystem the rest of the project uses (so one set of credentials, one
    endpoint and one retry policy apply everywhere), wrapped by pyarrow's FSSpecHandler.
    """
    import pyarrow.fs as pafs

    if is_local(url):
        path = str(url).removeprefix("file://")
        return pafs.LocalFileSystem(), os.path.abspath(path)
    fs, path = filesystem(url, storage_options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# Reading and writing -----------------------------------------------------------------------
def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether `url` exists now. Other processes write the same folders (Train workers, other nodes),
    so never from a cached listing: s3fs answers `exists` from its listing of the parent when it has
    one, and a file written after that listing would stay absent."""
    fs, path = filesystem(url, storage_options)
    with translate_errors(url, storage_options):
        fs.invalidate_cache(path)
        return fs.exists(path)


def listdir(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names (not paths) directly under `url`, sorted; [] when it does not exist."""
    fs, path = filesystem(url, storage_options)
    with translate_errors(url, storage_options):
        fs.invalidate_cache(path)  # listed afresh, as `exists`
        try:
            found = fs.ls(path, detail=False)
        except FileNotFoundError as err:
            if isinstance(classify(err, url), BucketNotFound):
                raise
            return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in found)


def sizes(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """{name: bytes} of the files directly under `url`, listed afresh (one listing); {} when it does
    not exist."""
    fs, path = filesystem(url, storage_options)
    with translate_errors(url, storage_options):
        fs.invalidate_cache(path)  # written by other processes: never a cached listing
        try:
            found = fs.ls(path, detail=True)
        except FileNotFoundError as err:
            if isinstance(classify(err, url), BucketNotFound):
                raise
            return {}
    return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in found
            if e.get("type") != "directory"}


def read_ranges(urls: list[str], starts: list[int], ends: list[int],
                storage_options: dict[str, Any] | None = None) -> list[bytes]:
    """Bytes [start, end) of each of `urls` (one filesystem), fetched concurrently where the store
    allows it (s3fs sends the ranged GETs at once)."""
    if not urls:
        return []
    fs, _ = filesystem(urls[0], storage_options)
    paths = [filesystem(u, storage_options)[1] for u in urls]
    with translate_errors(urls[0], storage_options):
        out = fs.cat_ranges(paths, starts, ends, on_error="raise")
    return [bytes(b) for b in out]


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    with translate_errors(url, storage_options):
        return fs.cat_file(path)


def read_text(url: str, storage_options: dict[str, Any] | None = None) -> str:
    return read_bytes(url, storage_options).decode()


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    data = read_bytes(url, storage_options)
    try:
        return json.loads(data)
    except json.JSONDecodeError as err:
        raise StorageError(f"{redact(url)}: not valid JSON ({err.msg} at line {err.lineno})", redact(url)) from None


@contextlib.contextmanager
def open_atomic(url: str, mode: str = "wb", storage_options: dict[str, Any] | None = None) -> Iterator[Any]:
    """Open `url` for writing; the target appears only when the block exits cleanly."""
    if mode not in ("wb", "w"):
        raise ValueError(f"open_atomic writes only ('w' or 'wb'), got {mode!r}")
    fs, path = filesystem(url, storage_options)
    if is_local(url):
        folder = os.path.dirname(os.path.abspath(path)) or "."
        with translate_errors(url):
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, mode) as f, translate_errors(url):  # a full disk fails inside the block
                yield f
                f.flush()
                os.fsync(f.fileno())
            with translate_errors(url):
                os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; an output has the mode a plain open would give
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return
    # Object store: stage locally, then one upload; the object appears whole or not at all.
    with tempfile.TemporaryDirectory(prefix="sar-upload-") as staging:
        tmp = os.path.join(staging, uuid.uuid4().hex)
        with open(tmp, mode) as f, translate_errors(tmp):  # the local disk that stages the upload
            yield f
        with translate_errors(url, storage_options):
            fs.put_file(tmp, path)


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
    with translate_errors(url, storage_options):
        if fs.exists(path):
            fs.rm(path, recursive=recursive)


def download_dir(url: str, local_dir: str, storage_options: dict[str, Any] | None = None) -> None:
    """Copy the files under `url` into a local folder."""
    fs, path = filesystem(url, storage_options)
    with translate_errors(url, storage_options):
        if not fs.exists(path):
            raise NotFound(f"not found: {redact(url)}", redact(url))
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
            raise NotFound(f"not found: {path}", path)
        return path
    fs, path = filesystem(url, storage_options)
    with translate_errors(url, storage_options):
        if not fs.exists(path):
            raise NotFound(f"not found: {redact(url)}", redact(url))
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

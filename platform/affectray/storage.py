"""One way to reach data: local paths, file:// and s3:// URIs.

Every path a user gives is a URI. Local paths and ``file://`` go to the local
filesystem, ``s3://bucket/key`` to S3 through s3fs (and pyarrow's native S3
client for Parquet datasets). ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``)
redirects every S3 client to MinIO, moto or any S3-compatible server.

Credentials come from the usual AWS chain and never pass through this module:
nothing here logs them, puts them in an error message or returns them.

Writes of one object are all-or-nothing: local files are written to a temporary
file beside the target and renamed; an S3 object only appears once its upload
has completed, and a failed multipart upload is aborted rather than committed.
``write_new`` creates an object only if none exists (a hard link locally, a
conditional PUT with ``If-None-Match: *`` on S3), so two processes can race for it.

Transient S3 errors (throttling such as 503 SlowDown, other 5xx, connection
resets, timeouts, short reads) are retried with exponential backoff and jitter,
in the process that met them, up to ``AFFECTRAY_STORAGE_ATTEMPTS`` attempts (each
one already s3fs's and botocore's own quick retries); past that they raise
:class:`StorageUnavailable`, carrying the service's own error text. Everything
else (missing, no access, bad request) is final at once.

S3 listings are never cached: markers and manifests are written by other
processes (Ray actors, a second job), and a cached listing would hide them.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import logging
import os
import posixpath
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

import fsspec

from affectray.errors import AffectrayError

__all__ = [
    "STORAGE_UNAVAILABLE",
    "StorageError",
    "StorageUnavailable",
    "atomic_writer",
    "exists",
    "get_filesystem",
    "is_remote",
    "join",
    "join_relative",
    "list_files",
    "local_copy",
    "makedirs",
    "open_input",
    "pyarrow_filesystem",
    "read_bytes",
    "read_json",
    "read_text",
    "remove",
    "s3_endpoint",
    "size",
    "upload_dir",
    "write_bytes",
    "write_json",
    "write_new",
    "write_new_json",
    "write_text",
]

logger = logging.getLogger("affectray.storage")
T = TypeVar("T")

_SCHEMES = ("", "file", "s3")
STORAGE_UNAVAILABLE = "storage unavailable"  # the reason jobs record: retryable, unlike bad input

# S3 error codes that say "not now" rather than "never".
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestLimitExceeded",
     "RequestTimeout", "InternalError", "ServiceUnavailable", "BadGateway", "GatewayTimeout", "OperationAborted"}
)  # fmt: skip
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.EPIPE})


class StorageError(AffectrayError):
    """A storage problem a user can cause: bad scheme, missing bucket or key, no access."""


class StorageUnavailable(StorageError):
    """The store kept failing with transient errors past the retries: nothing is wrong with the input.

    Jobs record the input with the reason ``storage unavailable`` and retry it on the next run.
    """

    reason = STORAGE_UNAVAILABLE


def _scheme(uri: str) -> str:
    uri = os.fspath(uri)
    # Windows drive letters ("C:\\x") parse as a scheme; treat them as local paths.
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if len(scheme) == 1:
        return ""
    if scheme == "s3a":
        scheme = "s3"
    if scheme not in _SCHEMES:
        raise StorageError(f"unsupported URI scheme {scheme!r} in {uri!r}: use a local path, file:// or s3://")
    return scheme


def is_remote(uri: str) -> bool:
    """True for object-store URIs (s3://), False for local paths and file://."""
    return _scheme(uri) == "s3"


def s3_endpoint() -> str | None:
    """The S3 endpoint from the standard AWS variables, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _strip(uri: str) -> str:
    """URI → the path the filesystem object understands (bucket/key or /local/path)."""
    uri = os.fspath(uri)
    scheme = _scheme(uri)
    if scheme == "s3":
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StorageError(f"S3 URI without a bucket: {uri!r}")
        return f"{parsed.netloc}{parsed.path}".rstrip("/")
    if scheme == "file":
        return str(Path(urlparse(uri).path).resolve())
    return str(Path(uri).expanduser().resolve())


def get_filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem for ``uri`` and the path inside it."""
    path = _strip(uri)
    if is_remote(uri):
        return _s3fs(), path
    return fsspec.filesystem("file"), path


def _s3fs() -> fsspec.AbstractFileSystem:
    import s3fs

    # No listings cache: done markers, _job.json and manifests are written by other processes, and
    # a listing cached before they wrote would hide them (a resumed ingest once failed on that).
    kwargs: dict[str, Any] = {"use_listings_cache": False}
    endpoint = s3_endpoint()
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    # fsspec caches instances per arguments, so clients are reused within a process.
    return s3fs.S3FileSystem(**kwargs)


def pyarrow_filesystem(uri: str) -> tuple[Any, str]:
    """A pyarrow filesystem for ``uri`` and the path inside it (for Ray Data and Parquet).

    S3 uses pyarrow's native client (bench/storage_pyarrow_fs.py measures it
    against s3fs wrapped in PyFileSystem); it is picklable, so Ray tasks get it
    as an argument.
    """
    import pyarrow.fs as pafs

    path = _strip(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), path
    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    }
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs), path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its scheme."""
    uri = os.fspath(uri)
    if _scheme(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def join_relative(root: str, relative: str) -> str:
    """Join a path taken from a manifest or annotation onto ``root``, refusing traversal.

    Absolute paths, URIs and any ``..`` component are refused: a manifest may
    only name files inside its own root.
    """
    rel = relative.replace("\\", "/")
    if urlparse(rel).scheme and len(urlparse(rel).scheme) > 1:
        raise StorageError(f"expected a path relative to {root!r}, got the URI {relative!r}")
    if rel.startswith("/") or any(part == ".." for part in rel.split("/")):
        raise StorageError(f"path {relative!r} points outside {root!r}; refused")
    return join(root, *[part for part in rel.split("/") if part not in ("", ".")])


def _translate(uri: str, error: BaseException) -> StorageError:
    """Turn a low-level error into a StorageError that names the URI, never credentials."""
    if isinstance(error, StorageError):
        return error
    if isinstance(error, FileNotFoundError):
        if is_remote(uri) and not _bucket_exists(uri):
            bucket = urlparse(uri).netloc
            return StorageError(f"bucket {bucket!r} does not exist (while accessing {uri!r})")
        return StorageError(f"not found: {uri!r}")
    if isinstance(error, PermissionError):
        return StorageError(f"access denied: {uri!r}")
    if isinstance(error, IsADirectoryError):
        return StorageError(f"is a directory, expected a file: {uri!r}")
    return StorageError(f"cannot access {uri!r}: {_service_text(error)}")


def _bucket_exists(uri: str) -> bool:
    fs = _s3fs()
    try:
        return bool(fs.exists(urlparse(uri).netloc))
    except Exception:  # noqa: BLE001 - an unreachable endpoint is reported by the caller
        return False


# -- transient errors: retried with backoff, then StorageUnavailable ----------------------


def retry_policy() -> tuple[int, float]:
    """(attempts, first backoff in seconds), read at each call so tests and jobs can set them.

    AFFECTRAY_STORAGE_ATTEMPTS (default 6) and AFFECTRAY_STORAGE_BACKOFF (default 1 s; it
    doubles per attempt, capped at 30 s, with jitter): about a minute of S3 throttling is
    waited out before an input is recorded as ``storage unavailable``.
    """
    attempts = int(os.environ.get("AFFECTRAY_STORAGE_ATTEMPTS") or 6)
    backoff = float(os.environ.get("AFFECTRAY_STORAGE_BACKOFF") or 1.0)
    return max(1, attempts), max(0.0, backoff)


def is_transient(error: BaseException) -> bool:
    """True for errors that say "not now" (throttling, 5xx, resets, timeouts, short reads), not "never"."""
    if isinstance(error, StorageUnavailable):
        return True
    if isinstance(error, (StorageError, FileNotFoundError, PermissionError, IsADirectoryError, FileExistsError)):
        return False
    return any(_transient_link(e) for e in _chain(error))


def _transient_link(error: BaseException) -> bool:
    import aiohttp
    import botocore.exceptions as boto

    if isinstance(error, boto.ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return code in _TRANSIENT_CODES or status == 429 or status >= 500 or code.startswith("5")
    transient_types = (
        boto.HTTPClientError, boto.ConnectionError, boto.IncompleteReadError,  # resets, timeouts, cut bodies
        aiohttp.ClientPayloadError, aiohttp.ClientConnectionError,
        ConnectionError, TimeoutError, http.client.IncompleteRead,
    )  # fmt: skip
    if isinstance(error, transient_types):
        return True
    # s3fs turns SlowDown and 503 into OSError(EBUSY), keeping the ClientError as the cause.
    return isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _service_text(error: BaseException) -> str:
    """What the store said (an S3 error's code and message, else the exception), without credentials."""
    import botocore.exceptions as boto

    said = next((e for e in _chain(error) if isinstance(e, boto.ClientError)), None)
    text = str(said) if said is not None else f"{type(error).__name__}: {error}".rstrip(": ")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:  # a shorter value would mangle the text, not hide a key
            text = text.replace(secret, "***")
    return text if len(text) <= 400 else text[:397] + "..."


def _retrying(uri: str, call: Callable[[], T]) -> T:
    """``call()``, retried while it fails transiently; raises StorageError (StorageUnavailable when retries ran out)."""
    if not is_remote(uri):
        try:
            return call()
        except Exception as error:  # noqa: BLE001
            raise _translate(uri, error) from None
    attempts, backoff = retry_policy()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - classified below
            if not is_transient(error):
                raise _translate(uri, error) from None
            if isinstance(error, StorageUnavailable) or attempt == attempts:
                raise _unavailable(uri, error, attempt) from None
            delay = min(30.0, backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
            logger.warning("%s: %s; attempt %d of %d, retrying in %.2f s",
                           uri, _service_text(error), attempt, attempts, delay)  # fmt: skip
            time.sleep(delay)
    raise AssertionError("unreachable")


def _unavailable(uri: str, error: BaseException, attempts: int) -> StorageUnavailable:
    if isinstance(error, StorageUnavailable):
        return error
    tries = "attempt" if attempts == 1 else "attempts"
    return StorageUnavailable(f"{STORAGE_UNAVAILABLE}: {uri!r}: {_service_text(error)} ({attempts} {tries})")


class _RetryingReader:
    """A remote file whose reads retry transient errors.

    S3 files fetch their byte ranges lazily, while a decoder reads, long after open()
    succeeded. A failed read leaves the position where it was, so it is simply read
    again. Once retries have run out every later read fails at once: a decoder that
    calls again after an error must not wait out the backoff a second time.
    """

    def __init__(self, f: IO[bytes], uri: str) -> None:
        self._f, self._uri = f, uri
        self._failed: StorageUnavailable | None = None

    def read(self, size: int = -1) -> bytes:
        if self._failed is not None:
            raise self._failed
        position = self._f.tell()

        def attempt() -> bytes:
            self._f.seek(position)
            return self._f.read(size)

        try:
            return _retrying(self._uri, attempt)
        except StorageUnavailable as error:
            self._failed = error
            raise

    def __getattr__(self, name: str) -> Any:  # seek, tell, size, closed, name, ...: the file's own
        return getattr(self._f, name)

    def __enter__(self) -> _RetryingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def exists(uri: str) -> bool:
    """True if a file or directory (or S3 prefix) exists at ``uri``."""
    fs, path = get_filesystem(uri)
    return _retrying(uri, lambda: bool(fs.exists(path)))


def size(uri: str) -> int:
    """Size of the object at ``uri`` in bytes."""
    fs, path = get_filesystem(uri)
    return _retrying(uri, lambda: int(fs.size(path)))


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """All files under ``uri`` (recursive), as URIs in the caller's form, sorted.

    ``suffixes`` filters by file-name ending, case-insensitively (".mp4", ".jpg").
    A missing root is an error; an empty one gives an empty list.
    """
    return sorted(file_sizes(uri, suffixes))


def file_sizes(uri: str, suffixes: tuple[str, ...] | None = None) -> dict[str, int]:
    """``list_files``'s files with their sizes in bytes, from the one listing."""
    fs, root = get_filesystem(uri)

    def find() -> dict[str, Any]:
        if not fs.exists(root):
            raise FileNotFoundError(root)
        return fs.find(root, detail=True)

    found = _retrying(uri, find)
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    out = {}
    for path, info in found.items():
        rel = path[len(root) :].lstrip("/") if path.startswith(root) else posixpath.basename(path)
        if not rel:  # uri names a single file
            out[os.fspath(uri)] = int(info.get("size") or 0)
            continue
        if wanted and not rel.lower().endswith(wanted):
            continue
        out[join(uri, *rel.split("/"))] = int(info.get("size") or 0)
    return out


def read_bytes(uri: str) -> bytes:
    """The whole object at ``uri``."""
    fs, path = get_filesystem(uri)
    return _retrying(uri, lambda: fs.cat_file(path))


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


@contextlib.contextmanager
def atomic_writer(uri: str) -> Iterator[IO[bytes]]:
    """Open ``uri`` for binary writing; the object appears whole at exit, or not at all."""
    fs, path = get_filesystem(uri)
    if not is_remote(uri):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return
    # S3: stage locally, upload once complete. A streamed multipart upload would
    # be committed by fsspec even when the writer fails halfway.
    with tempfile.NamedTemporaryFile(prefix="affectray-upload-") as staged:
        yield staged
        staged.flush()
        _retrying(uri, lambda: fs.put_file(staged.name, path))


def write_bytes(uri: str, data: bytes | memoryview) -> None:
    """Write one object all-or-nothing (``data``: bytes or any bytes-like view)."""
    if is_remote(uri):
        fs, path = get_filesystem(uri)
        data = bytes(data)  # botocore takes bytes, not views
        _retrying(uri, lambda: fs.pipe_file(path, data))  # one PUT: the object appears complete or not at all
        return
    with atomic_writer(uri) as f:
        f.write(data)


def write_new(uri: str, data: bytes) -> bool:
    """Create the object only if none exists: True if this call created it, False if it was there.

    Two processes racing for one name get exactly one True. The object appears whole:
    locally a complete temporary file is hard-linked into place (link fails if the name
    exists; O_EXCL alone would let a reader see it half-written); on S3 a conditional
    PUT (``If-None-Match: *``) is refused with 412 when the key exists.
    """
    fs, path = get_filesystem(uri)
    if is_remote(uri):

        def put() -> bool:
            try:
                fs.pipe_file(path, data, mode="create")
            except FileExistsError:  # also when a retried PUT had in fact landed: the caller reads it back
                return False
            return True

        return _retrying(uri, put)
    try:
        return _link_new(path, data)
    except OSError as error:
        raise _translate(uri, error) from None


def _link_new(path: str, data: bytes) -> bool:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, _json_text(obj))


def write_new_json(uri: str, obj: Any) -> bool:
    """``write_new`` for a JSON document."""
    return write_new(uri, _json_text(obj).encode("utf-8"))


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


@contextlib.contextmanager
def open_input(uri: str) -> Iterator[IO[bytes]]:
    """A seekable binary file object for reading ``uri`` (streams from S3, no full copy).

    Reads of a remote file retry transient errors (see the module docstring).
    """
    fs, path = get_filesystem(uri)
    f = _retrying(uri, lambda: fs.open(path, "rb"))
    with f:
        yield _RetryingReader(f, uri) if is_remote(uri) else f


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local path holding the object at ``uri``: the file itself, or a temporary download."""
    if not is_remote(uri):
        path = _strip(uri)
        if not os.path.exists(path):
            raise StorageError(f"not found: {uri!r}")
        yield path
        return
    suffix = posixpath.splitext(urlparse(uri).path)[1]
    with tempfile.TemporaryDirectory(prefix="affectray-") as tmp:
        local = os.path.join(tmp, f"{uuid.uuid4().hex}{suffix}")
        fs, path = get_filesystem(uri)
        _retrying(uri, lambda: fs.get_file(path, local))
        yield local


def makedirs(uri: str) -> None:
    """Create a local directory; a no-op on S3, where prefixes need no creation."""
    if not is_remote(uri):
        os.makedirs(_strip(uri), exist_ok=True)


def remove(uri: str, recursive: bool = False) -> None:
    """Delete a file (or a whole tree with ``recursive``); missing targets are fine."""
    fs, path = get_filesystem(uri)

    def rm() -> None:
        if fs.exists(path):
            fs.rm(path, recursive=recursive)

    _retrying(uri, rm)


def upload_dir(local_dir: str | os.PathLike, uri: str) -> list[str]:
    """Copy every file under ``local_dir`` to ``uri``, each object written atomically."""
    local_dir = Path(local_dir)
    written = []
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(local_dir).as_posix()
        target = join(uri, *rel.split("/"))
        write_bytes(target, path.read_bytes())
        written.append(target)
    return written

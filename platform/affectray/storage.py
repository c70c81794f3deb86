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
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import fsspec

from affectray.errors import AffectrayError

__all__ = [
    "StorageError",
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
    "write_text",
]

_SCHEMES = ("", "file", "s3")


class StorageError(AffectrayError):
    """A storage problem a user can cause: bad scheme, missing bucket or key, no access."""


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

    kwargs: dict[str, Any] = {}
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
    return StorageError(f"cannot access {uri!r}: {type(error).__name__}")


def _bucket_exists(uri: str) -> bool:
    fs = _s3fs()
    try:
        return bool(fs.exists(urlparse(uri).netloc))
    except Exception:  # noqa: BLE001 - an unreachable endpoint is reported by the caller
        return False


def exists(uri: str) -> bool:
    """True if a file or directory (or S3 prefix) exists at ``uri``."""
    fs, path = get_filesystem(uri)
    try:
        return bool(fs.exists(path))
    except Exception as error:  # noqa: BLE001
        raise _translate(uri, error) from None


def size(uri: str) -> int:
    """Size of the object at ``uri`` in bytes."""
    fs, path = get_filesystem(uri)
    try:
        return int(fs.size(path))
    except Exception as error:  # noqa: BLE001
        raise _translate(uri, error) from None


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """All files under ``uri`` (recursive), as URIs in the caller's form, sorted.

    ``suffixes`` filters by file-name ending, case-insensitively (".mp4", ".jpg").
    A missing root is an error; an empty one gives an empty list.
    """
    return sorted(file_sizes(uri, suffixes))


def file_sizes(uri: str, suffixes: tuple[str, ...] | None = None) -> dict[str, int]:
    """``list_files``'s files with their sizes in bytes, from the one listing."""
    fs, root = get_filesystem(uri)
    try:
        if not fs.exists(root):
            raise FileNotFoundError(root)
        found = fs.find(root, detail=True)
    except Exception as error:  # noqa: BLE001
        raise _translate(uri, error) from None
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
    try:
        return fs.cat_file(path)
    except Exception as error:  # noqa: BLE001
        raise _translate(uri, error) from None


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
        try:
            fs.put_file(staged.name, path)
        except Exception as error:  # noqa: BLE001
            raise _translate(uri, error) from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object all-or-nothing."""
    if is_remote(uri):
        fs, path = get_filesystem(uri)
        try:
            fs.pipe_file(path, data)  # one PUT: the object appears complete or not at all
        except Exception as error:  # noqa: BLE001
            raise _translate(uri, error) from None
        return
    with atomic_writer(uri) as f:
        f.write(data)


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def open_input(uri: str) -> Iterator[IO[bytes]]:
    """A seekable binary file object for reading ``uri`` (streams from S3, no full copy)."""
    fs, path = get_filesystem(uri)
    try:
        f = fs.open(path, "rb")
    except Exception as error:  # noqa: BLE001
        raise _translate(uri, error) from None
    with f:
        yield f


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
        try:
            fs.get_file(path, local)
        except Exception as error:  # noqa: BLE001
            raise _translate(uri, error) from None
        yield local


def makedirs(uri: str) -> None:
    """Create a local directory; a no-op on S3, where prefixes need no creation."""
    if not is_remote(uri):
        os.makedirs(_strip(uri), exist_ok=True)


def remove(uri: str, recursive: bool = False) -> None:
    """Delete a file (or a whole tree with ``recursive``); missing targets are fine."""
    fs, path = get_filesystem(uri)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=recursive)
    except Exception as error:  # noqa: BLE001
        raise _translate(uri, error) from None


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

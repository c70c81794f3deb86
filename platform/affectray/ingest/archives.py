"""Ingest sources packed as tar archives: unpacked to a temporary folder first.

FER2013's images come as ``train.tar`` / ``publictest.tar`` (``<split>/<class>/<name>.jpg``);
a recipe names the archive and the ingest reads the folder it unpacks to. Unpacking uses
tarfile's ``data`` filter: members that are absolute, reach outside the target (``..``),
or are links, devices or special files are refused, so an archive cannot write elsewhere.
Unit keys hash paths relative to the source, so a second unpack (a resumed ingest)
produces the same keys and finished units are skipped.
"""

from __future__ import annotations

import contextlib
import logging
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from affectray import storage

__all__ = ["ARCHIVE_SUFFIXES", "is_archive", "unpacked_source"]

logger = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def is_archive(source: str) -> bool:
    return source.lower().endswith(ARCHIVE_SUFFIXES)


@contextlib.contextmanager
def unpacked_source(source: str) -> Iterator[str]:
    """``source`` itself, or for a tar archive (local or s3://) the temporary folder it unpacks to."""
    if not is_archive(source):
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="affectray-unpack-") as tmp:
        archive = source.removeprefix("file://")
        if storage.is_remote(source):
            archive = str(Path(tmp, "archive" + Path(source).suffix))
            Path(archive).write_bytes(storage.read_bytes(source))
        target = Path(tmp, "source")
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(target, filter="data")
        except (tarfile.TarError, OSError) as error:
            raise storage.StorageError(f"cannot unpack {source}: {error}") from error
        logger.info("unpacked %s into %s", source, target)
        yield str(target)

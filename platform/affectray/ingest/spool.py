"""A video's face JPEGs on local disk while it decodes, so an ingest actor's memory does not grow with it.

Which tracks a video keeps is known only once it has been read to the end
(``select_tracks``), so every face is kept until then: its JPEG in a temporary
file, its frame, time, score and place in that file in memory (36 bytes a face,
about 4 MB for an hour at 30 fps). Faces of the tracks kept are read back a
segment at a time; the others never are. The file has no name (it is unlinked as
it is made, where the OS allows), so it goes when the spool is closed, whether the
unit succeeded or not, and with the process if an actor is killed or crashes.
"""

from __future__ import annotations

import os
import tempfile
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class _Faces:
    """One track's faces, in the order they were found."""

    frames: array = field(default_factory=lambda: array("q"))
    pts: array = field(default_factory=lambda: array("d"))
    scores: array = field(default_factory=lambda: array("d"))
    offsets: array = field(default_factory=lambda: array("q"))
    lengths: array = field(default_factory=lambda: array("q"))


class FaceSpool:
    """Face JPEGs by track, spooled to a temporary file in ``directory`` (default: the process's temp dir).

    with FaceSpool() as spool:
        spool.add(track_id, frame, pts, jpeg, score)
        frames, pts, scores, images = spool.track(track_id)  # images[a:b]: read from disk then
    """

    def __init__(self, directory: str | None = None) -> None:
        self._file = tempfile.TemporaryFile(prefix="affectray-faces-", suffix=".jpegs", dir=directory)
        self.bytes = 0
        self._tracks: dict[int, _Faces] = {}

    def add(self, track_id: int, frame: int, pts: float, jpeg: bytes, score: float) -> None:
        self._file.write(jpeg)
        faces = self._tracks.setdefault(track_id, _Faces())
        faces.frames.append(frame)
        faces.pts.append(pts)
        faces.scores.append(score)
        faces.offsets.append(self.bytes)
        faces.lengths.append(len(jpeg))
        self.bytes += len(jpeg)

    def track(self, track_id: int) -> tuple[list[int], list[float], list[float], SpooledImages]:
        """A track's frame indices, times, detection scores and (read lazily) JPEGs."""
        self._file.flush()
        faces = self._tracks[track_id]
        return (
            faces.frames.tolist(),
            faces.pts.tolist(),
            faces.scores.tolist(),
            SpooledImages(self._file.fileno(), faces.offsets, faces.lengths),
        )

    def close(self) -> None:
        self._file.close()  # its space is freed with its last descriptor
        self._tracks.clear()

    def __enter__(self) -> FaceSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SpooledImages(Sequence):
    """A track's JPEGs as a sequence; each one (or slice) is read from the spool file when asked for."""

    def __init__(self, fd: int, offsets: array, lengths: array) -> None:
        self._fd, self._offsets, self._lengths = fd, offsets, lengths

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._read(i) for i in range(*index.indices(len(self)))]
        return self._read(range(len(self))[index])

    def _read(self, i: int) -> bytes:
        length = self._lengths[i]
        data = os.pread(self._fd, length, self._offsets[i])
        if len(data) != length:
            raise OSError(f"face spool: {len(data)} of {length} bytes at offset {self._offsets[i]}")
        return data

"""The packed file beside a JSONL history: the same steps as binary rows, so that a long run reads back at disk
speed rather than at JSON-decoding speed (a million steps in seconds instead of minutes).

A :class:`~gradconflict.records.sinks.JSONLSink` writing ``run.jsonl`` also writes ``run.jsonl.packed``: a sequence of
frames, each holding up to :data:`FRAME_ROWS` consecutive steps that share a layout, as the int64 steps and the
float64 rows of the History's packed storage. Each row is made from the very line the sink wrote, by the function
that decodes lines (:func:`~gradconflict.records.sinks.jsonl.read_blocks`), so both give the same numbers bit for bit.
A frame also records the byte range and line count of its lines in the JSONL, and the length and checksum of the
last one.

The JSONL stays the record; the packed file is a cache of it. A reader uses a frame only while everything holds:
the frame is whole (its own checksum), it starts after the previous one, and the JSONL still ends the frame's range
with the same line. From the first frame that does not hold, the reader decodes the JSON lines, as it does for every
line no frame covers (the last steps before a crash, lines a resumed run wrote before its first frame). So a
missing, cut or stale packed file costs speed, never a step. After editing a JSONL by hand, delete its packed file.

Frame layout (little-endian): the 8 bytes :data:`MAGIC`, a uint32 header length, the header (UTF-8 JSON: layout,
skip reason, rows, width, JSONL byte range ``start``/``end``, ``lines`` up to ``end``, and ``last``: length and
CRC-32 of the last line), ``rows`` int64 steps, ``rows x width`` float64 values, then the CRC-32 of the header and
the arrays.

>>> import tempfile, torch
>>> from gradconflict import ConflictReport, History
>>> from gradconflict.records.sinks import JSONLSink
>>> path = tempfile.mkdtemp() + "/run.jsonl"
>>> sink = JSONLSink(path)
>>> for s in range(3):
...     sink.write(ConflictReport(("a", "b"), torch.tensor([[1.0, -0.5], [-0.5, 2.0]]), step=s))
>>> sink.close()
>>> [(b.steps.tolist(), b.start, b.lines) for b in read_packed(path)]
[([0, 1, 2], 0, 3)]
>>> History.from_jsonl(path)[2].gram.tolist()
[[1.0, -0.5], [-0.5, 2.0]]
"""

from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from gradconflict.records._steps import Layout

__all__ = ["FRAME_ROWS", "MAGIC", "SUFFIX", "PackedBlock", "PackedWriter", "packed_path", "read_packed"]

#: The suffix of the packed file: ``run.jsonl`` -> ``run.jsonl.packed``.
SUFFIX = ".packed"

#: The first bytes of every frame (the format's version is its last two characters).
MAGIC = b"GCPACK01"

#: Steps per frame: the steps a crash can leave to the JSON decoder, and the rows the sink holds in memory.
FRAME_ROWS = 1024

_LENGTH = struct.Struct("<I")


def packed_path(jsonl: str | Path) -> Path:
    """The packed file of a JSONL history (``run.jsonl`` -> ``run.jsonl.packed``)."""
    jsonl = Path(jsonl)
    return jsonl.with_name(jsonl.name + SUFFIX)


class PackedBlock(NamedTuple):
    """Consecutive frames that share a layout and follow each other in the JSONL, read into one array.

    Attributes:
        layout: what the steps share.
        reason: the skip reason of every step ("" for measured steps).
        steps: ``[N]`` int64, the steps.
        packed: ``[N, K]`` float64 rows in the History's packed layout.
        start, end: the byte range of their lines in the JSONL.
        lines: the JSONL's line count up to ``end``.
    """

    layout: Layout
    reason: str
    steps: Tensor
    packed: Tensor
    start: int
    end: int
    lines: int


@dataclass(frozen=True)
class _Frame:
    offset: int  # where the frame's header starts in the packed file
    header: bytes
    layout: Layout
    reason: str
    rows: int
    width: int
    start: int
    end: int
    lines: int

    @property
    def data(self) -> int:
        """Where its arrays start in the packed file."""
        return self.offset + len(MAGIC) + _LENGTH.size + len(self.header)

    @property
    def size(self) -> int:
        """Its bytes in the packed file, checksum included."""
        return self.data - self.offset + 8 * self.rows * (1 + self.width) + _LENGTH.size


def _layout_dict(layout: Layout) -> dict[str, Any]:
    return {
        "tasks": list(layout.tasks), "layers": [list(x) for x in layout.layers], "engine": layout.engine,
        "strategy": layout.strategy, "approximate": layout.approximate, "threshold": layout.threshold,
        "has_losses": layout.has_losses, "sync": layout.sync,
    }


def _layout(d: dict[str, Any]) -> Layout:
    return Layout(
        tuple(str(t) for t in d["tasks"]), tuple((str(n), int(k), str(r)) for n, k, r in d["layers"]),
        str(d["engine"]), str(d["strategy"]), bool(d["approximate"]), float(d["threshold"]), bool(d["has_losses"]),
        str(d["sync"]),
    )


def _frames(jsonl: Path) -> Iterator[_Frame]:
    """The packed file's frames, in order, up to the first one that does not hold against its own length or the
    JSONL (the checksum of the arrays is checked where they are read)."""
    try:
        f = packed_path(jsonl).open("rb")
    except OSError:  # none, or not readable: the JSON is read instead
        return
    with f, jsonl.open("rb") as text:
        size, text_size = os.fstat(f.fileno()).st_size, os.fstat(text.fileno()).st_size
        offset, previous_end = 0, 0
        while offset < size:
            f.seek(offset)
            head = f.read(len(MAGIC) + _LENGTH.size)
            if len(head) < len(MAGIC) + _LENGTH.size or head[: len(MAGIC)] != MAGIC:
                return
            header = f.read(_LENGTH.unpack(head[len(MAGIC) :])[0])
            try:
                d = json.loads(header)
                frame = _Frame(offset, header, _layout(d["layout"]), str(d["reason"]), int(d["rows"]),
                               int(d["width"]), int(d["start"]), int(d["end"]), int(d["lines"]))
                last_length, last_crc = (int(x) for x in d["last"])
            except (ValueError, KeyError, TypeError):
                return
            if offset + frame.size > size or frame.start < previous_end or frame.end > text_size:
                return
            text.seek(frame.end - last_length)
            last = text.read(last_length)
            if not last.endswith(b"\n") or zlib.crc32(last) != last_crc:
                return  # the JSONL no longer holds these lines
            yield frame
            offset, previous_end = offset + frame.size, frame.end


def read_packed(jsonl: str | Path) -> Iterator[PackedBlock]:
    """The steps the packed file of ``jsonl`` holds, in file order, as blocks of consecutive frames that share a
    layout and follow each other in the JSONL; it stops at the first frame that does not hold (see the module's
    docstring), and yields nothing when there is no packed file. The lines outside the blocks are the JSON
    reader's to decode."""
    jsonl = Path(jsonl)
    frames = list(_frames(jsonl))
    if not frames:
        return
    with packed_path(jsonl).open("rb") as f:
        k = 0
        while k < len(frames):
            first, stop = frames[k], k + 1
            while stop < len(frames) and _joins(frames[stop - 1], frames[stop]):
                stop += 1
            group = frames[k:stop]
            steps = np.empty(sum(fr.rows for fr in group), dtype="<i8")
            packed = np.empty((len(steps), first.width), dtype="<f8")
            row = 0
            for n, frame in enumerate(group):
                f.seek(frame.data)
                span = slice(row, row + frame.rows)
                whole = f.readinto(steps[span].data.cast("B")) == 8 * frame.rows
                whole &= f.readinto(packed[span].data.cast("B")) == 8 * frame.rows * frame.width
                crc = zlib.crc32(packed[span].data, zlib.crc32(steps[span].data, zlib.crc32(frame.header)))
                tail = f.read(_LENGTH.size)
                if not whole or len(tail) != _LENGTH.size or _LENGTH.unpack(tail)[0] != crc:
                    if n:  # the group's frames before this one hold
                        last = group[n - 1]
                        yield _block(first, last, steps[:row], packed[:row])
                    return
                row += frame.rows
            yield _block(first, group[-1], steps, packed)
            k = stop


def _joins(a: _Frame, b: _Frame) -> bool:
    return b.start == a.end and b.layout == a.layout and b.reason == a.reason and b.width == a.width


def _block(first: _Frame, last: _Frame, steps: np.ndarray, packed: np.ndarray) -> PackedBlock:
    return PackedBlock(first.layout, first.reason, torch.from_numpy(steps), torch.from_numpy(packed),
                       first.start, last.end, last.lines)


class PackedWriter:
    """Writes the packed file of a JSONL history as its lines are written (:class:`JSONLSink`'s part).

    Args:
        jsonl: the JSONL file, already opened for writing by its sink (and, when appending, already cut back to
            its last complete line).
        overwrite: start the packed file afresh; otherwise keep its frames that still hold against the JSONL and
            append after them.

    A failure to write the packed file never stops the JSONL: the writer warns once and stops (readers then decode
    the JSON of the steps it did not cover).
    """

    def __init__(self, jsonl: Path, *, overwrite: bool) -> None:
        self.path = packed_path(jsonl)
        self._file: IO[bytes] | None = None
        self._layout: Layout | None = None
        self._reason = ""
        self._steps: list[int] = []
        self._rows: list[Sequence[float]] = []
        self._start = self._position = 0
        self._lines = 0
        self._last = b""
        try:
            if overwrite or not jsonl.exists():
                self.path.unlink(missing_ok=True)
            else:
                self._resume(jsonl)
            self._file = self.path.open("ab")
        except OSError as err:
            self._fail(err)

    def _resume(self, jsonl: Path) -> None:
        """Keep the frames that hold, and take the JSONL's length and line count from the last of them."""
        frames = list(_frames(jsonl))
        kept = frames[-1].offset + frames[-1].size if frames else 0
        if self.path.exists() and self.path.stat().st_size != kept:
            os.truncate(self.path, kept)
        position, lines = (frames[-1].end, frames[-1].lines) if frames else (0, 0)
        with jsonl.open("rb") as f:  # count the lines no frame covers (all of them when there is no frame)
            f.seek(position)
            while chunk := f.read(1 << 24):
                lines += chunk.count(b"\n")
                position += len(chunk)
        self._start = self._position = position
        self._lines = lines

    def add(self, layout: Layout | None, reason: str, step: int, row: Sequence[Any] | None, line: bytes) -> None:
        """Cover the line just written to the JSONL: ``row`` its packed row (``None``, or a value that is not a
        number, leaves that line to the JSON reader)."""
        if self._file is None:
            return
        if row is not None and None in row:  # a number strict JSON could not hold (not finite): left to the JSON
            row = None
        if self._steps and (
            row is None or layout != self._layout or reason != self._reason or len(self._steps) >= FRAME_ROWS
        ):
            self.flush()
        if row is not None:
            if not self._steps:
                self._layout, self._reason, self._start = layout, reason, self._position
            self._steps.append(step)
            self._rows.append(row)
            self._last = line
        self._position += len(line)
        self._lines += 1

    def flush(self) -> None:
        """Write the rows held as one frame."""
        if self._file is None or not self._steps or self._layout is None:
            return
        steps = np.asarray(self._steps, dtype="<i8")
        try:
            packed = np.asarray(self._rows, dtype="<f8")
        except (ValueError, TypeError):  # rows of unequal width: those lines stay the JSON reader's
            self._steps, self._rows = [], []
            return
        header = json.dumps({
            "layout": _layout_dict(self._layout), "reason": self._reason, "rows": len(steps),
            "width": packed.shape[1], "start": self._start, "end": self._position, "lines": self._lines,
            "last": [len(self._last), zlib.crc32(self._last)],
        }).encode()
        crc = zlib.crc32(packed.data, zlib.crc32(steps.data, zlib.crc32(header)))
        self._steps, self._rows = [], []
        try:
            self._file.write(MAGIC + _LENGTH.pack(len(header)) + header + steps.tobytes() + packed.tobytes()
                             + _LENGTH.pack(crc))
            self._file.flush()
        except OSError as err:
            self._fail(err)

    def close(self) -> None:
        """Write what is held and close."""
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _fail(self, err: OSError) -> None:
        warnings.warn(
            f"gradconflict: cannot write {self.path} ({err}): the JSONL history goes on, and is read back by "
            "decoding its JSON (slower on long runs)",
            RuntimeWarning,
            stacklevel=4,
        )
        if self._file is not None:
            self._file.close()
        self._file = None

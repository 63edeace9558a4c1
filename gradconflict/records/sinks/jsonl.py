"""The JSONL sink: one JSON line per step, appended and flushed as it is collected, so a run that crashes loses
nothing it measured. It needs nothing beyond the standard library.

Each line is the step's :meth:`~gradconflict.ConflictReport.to_dict` with the schema version in front
(``{"schema": 2, "step": ..., ...}``): the format of :meth:`gradconflict.History.to_jsonl`, which
``History.from_jsonl`` and the command line (``gradconflict report``, ``gradconflict advise``) read back. A line
lists its layers bottom to top, in the model's order, so that a saved run keeps it; a line of schema 1 (which
listed them as the backward reached them) is read with its layers in natural order of the names
(:mod:`~gradconflict.records.layers`). ``docs/integrations.md`` lists every field.

A run killed mid-write (a full disk, ``kill -9``) leaves its last line cut short. A sink that resumes the file
first truncates it to its last complete line, with a warning, so the run goes on after a whole line; and
:func:`read_reports`, which every reader uses, skips a line that is not JSON with a warning naming its line
number, so a cut line left in the middle by an older resume costs that line, not the run.

>>> import json, tempfile, torch
>>> from gradconflict import ConflictReport
>>> path = tempfile.mkdtemp() + "/run.jsonl"
>>> sink = JSONLSink(path)
>>> sink.write(ConflictReport(("a", "b"), torch.eye(2), step=3))
>>> sink.close()
>>> line = json.loads(open(path).readline())
>>> line["schema"], line["step"], line["cosine"]
(2, 3, [[1.0, 0.0], [0.0, 1.0]])
"""

from __future__ import annotations

import json
import math
import os
import warnings
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from gradconflict.measure.metrics import CONFLICT_COSINE
from gradconflict.measure.report import ConflictReport
from gradconflict.records._steps import Layout
from gradconflict.records.history import LINE_SCHEMA, json_line, report_record
from gradconflict.records.layers import natural_key
from gradconflict.records.samples import SampleTally
from gradconflict.records.sinks.packed import PackedWriter, packed_path, read_packed

__all__ = ["JSONLSink", "read_blocks", "read_reports"]

#: Steps per block of :func:`read_blocks` (a few MB of Python numbers while a block is read).
BLOCK_ROWS = 4096

#: The first line schema that lists the layers bottom to top.
_LAYERS_IN_ORDER = 2


class JSONLSink:
    """Appends each step to a JSONL file as it is collected, and flushes it.

    Args:
        path: the file (its folder is created). An existing file is appended to, so a resumed run continues it
            (after truncating a last line cut short by a crash, with a warning); ``overwrite=True`` starts it
            afresh.
        overwrite: truncate the file first.
        packed: also write the packed file beside it (``run.jsonl.packed``, :mod:`~gradconflict.records.sinks.packed`):
            the same steps as binary rows, which readers use to read a long run back at disk speed. It is a cache:
            without it (``packed=False``, or deleted) every reader decodes the JSON, giving the same history.

    >>> import tempfile
    >>> JSONLSink(tempfile.mkdtemp() + "/runs/a.jsonl").path.name
    'a.jsonl'
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False, packed: bool = True) -> None:
        self.path = Path(path)
        self.packed = packed
        self._mode = "w" if overwrite else "a"
        self._file: IO[bytes] | None = None  # opened at the first step: a rank that never writes never opens it
        self._packed: PackedWriter | None = None

    def write(self, report: ConflictReport) -> None:
        """Append one step and flush."""
        file = self._file
        if file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._mode == "a":
                _truncate_cut_line(self.path)
            file = self._file = open(self.path, self._mode + "b")  # noqa: SIM115 (closed by close())
            if self.packed:
                self._packed = PackedWriter(self.path, overwrite=self._mode == "w")
            elif self._mode == "w":  # an older run's packed file would no longer match
                packed_path(self.path).unlink(missing_ok=True)
        data = report_record(report)
        line = json_line(data).encode()
        file.write(line)
        file.flush()
        if self._packed is not None:
            try:  # a step with its per-example attribution is left to the JSON, which holds it
                layout, reason, row = _row(data) if "samples" not in data else (None, "", None)
            except (KeyError, ValueError, TypeError):  # left to the JSON reader, which names what is wrong
                layout, reason, row = None, "", None
            self._packed.add(layout, reason, data["step"], row, line)

    def close(self) -> None:
        """Close the file (and write the packed rows held)."""
        if self._packed is not None:
            self._packed.close()
        if self._file is not None:
            self._file.close()

    def __repr__(self) -> str:
        return f"JSONLSink({str(self.path)!r})"


def _truncate_cut_line(path: Path) -> None:
    """Cut a file that does not end with a newline back to its last complete line (a line cut short by a crash),
    with a warning: appending after it would leave the cut line in the middle of the file."""
    try:
        f = path.open("r+b")
    except FileNotFoundError:
        return
    with f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        # Walk back in blocks to the last newline: a cut line is one line, so this reads a few kB.
        keep, block = 0, 1 << 16
        position = end
        while position > 0:
            start = max(0, position - block)
            f.seek(start)
            chunk = f.read(position - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            position = start
        f.truncate(keep)
    warnings.warn(
        f"gradconflict: {path} ended with a line cut short (the previous run stopped while writing it): "
        f"truncated it to its last complete line, dropping {end - keep} bytes, before appending",
        RuntimeWarning,
        stacklevel=4,
    )


def read_reports(path: str | Path) -> Iterator[ConflictReport]:
    """The reports of a JSONL history, in file order, read one line at a time.

    A line that is not JSON (cut short by a crash) is skipped with a :class:`RuntimeWarning` that names its line
    number. A JSON line that is not a history step, a Gram of the wrong size, or a line of a newer schema is an
    error: a ``ValueError`` naming the line and the field, since that file was not written by gradconflict (or
    needs a newer one). Blank lines are ignored.

    >>> import tempfile, torch, warnings
    >>> path = tempfile.mkdtemp() + "/run.jsonl"
    >>> sink = JSONLSink(path)
    >>> for s in range(3):
    ...     sink.write(ConflictReport(("a", "b"), torch.eye(2), step=s))
    >>> sink.close()
    >>> lines = open(path).read().splitlines()
    >>> _ = open(path, "w").write("\\n".join([lines[0], lines[1][:40], lines[2]]) + "\\n")
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     steps = [r.step for r in read_reports(path)]
    >>> steps, "line 2" in str(caught[0].message)
    ([0, 2], True)
    """
    for where, data in json_lines(path):
        yield _report(data, where)


def read_blocks(
    path: str | Path, rows: int | None = None, samples: SampleTally | None = None
) -> Iterator[tuple[Layout, Sequence[int], str, Tensor]]:
    """The steps of a JSONL history in file order, in blocks of consecutive steps that share one layout:
    ``(layout, steps, skip reason, packed)``, ``packed`` being ``[N, K]`` float64 rows in the History's packed
    layout (what :meth:`History.from_jsonl <gradconflict.History.from_jsonl>` stores). No report object is built
    per line.

    The steps its packed file holds (:mod:`~gradconflict.records.sinks.packed`) are read from it, in blocks as long
    as its frames run; every other line is decoded from the JSON, in blocks of up to ``rows``
    (:data:`BLOCK_ROWS` by default; a skipped step is a block of its own), checked, warned about and named in
    errors exactly as :func:`read_reports` does. Both give the same numbers. With ``samples``, the same pass adds
    each step's per-example attribution (steps measured with ``sample_ids``, which the packed file leaves to the
    JSON) to that tally (:meth:`SampleTally.add_saved <gradconflict.records.samples.SampleTally.add_saved>`)."""
    rows, position, lines = rows or BLOCK_ROWS, 0, 0
    for block in read_packed(path):
        if block.start > position:
            yield from _decoded_blocks(path, rows, position, block.start, lines, samples)
        yield block.layout, block.steps.tolist(), block.reason, block.packed
        position, lines = block.end, block.lines
    yield from _decoded_blocks(path, rows, position, None, lines, samples)


def _decoded_blocks(
    path: str | Path, rows: int, start: int, stop: int | None, lines: int, samples: SampleTally | None
) -> Iterator[tuple[Layout, Sequence[int], str, Tensor]]:
    """:func:`read_blocks` of the lines in bytes ``[start, stop)``, decoded from the JSON (``lines`` before them)."""
    layout: Layout | None = None
    # The steps in a C array, not the decoder's int objects: those would pin memory among each line's garbage.
    steps = array("q")
    values: list[list[Any]] = []
    wheres: list[str] = []
    for where, data in json_lines(path, start, stop, lines):
        try:
            bad = _check(data, where)
            try:
                line_layout, reason, row = _row(data)
            except (KeyError, ValueError, TypeError) as err:
                raise bad(f"{type(err).__name__}: {err}") from err
        except ValueError:
            if steps:  # an earlier line of the pending block may hold the first error
                _packed(values, wheres)
            raise
        if samples is not None:
            samples.add_saved(data.get("samples"))
        if steps and (reason or line_layout != layout or len(steps) == rows):
            yield layout, steps, "", _packed(values, wheres)  # type: ignore[misc]
            steps, values, wheres = array("q"), [], []
        if reason:
            yield line_layout, array("q", [data["step"]]), reason, _packed([row], [where])
            continue
        layout = line_layout
        steps.append(data["step"])
        values.append(row)
        wheres.append(where)
    if steps:
        yield layout, steps, "", _packed(values, wheres)  # type: ignore[misc]


def json_lines(path: str | Path, start: int = 0, stop: int | None = None, lines: int = 0) -> Iterator[tuple[str, Any]]:
    """``(where, decoded line)`` of each line that is JSON, in bytes ``[start, stop)`` of the file (the whole file
    by default; ``lines`` before ``start``, for the line numbers); a line that is not is skipped with a warning."""
    with open(path, "rb") as f:
        f.seek(start)
        position, number = start, lines
        for line in f:
            if stop is not None and position >= stop:
                break
            position += len(line)
            number += 1
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                what = f"{err.msg} at column {err.colno}" if isinstance(err, json.JSONDecodeError) else "not UTF-8"
                warnings.warn(
                    f"gradconflict: {path}, line {number} is not JSON ({what}), probably cut short by a crash: "
                    "skipped",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            yield f"{path}:{number}", data


def _row(data: Mapping[str, Any]) -> tuple[Layout, str, list[Any]]:
    """A checked line's layout, skip reason and packed row (numbers not yet checked), with the defaults of
    :meth:`ConflictReport.from_dict` and :meth:`History.append <gradconflict.History.append>`."""
    tasks = tuple(data["tasks"])
    T = len(tasks)
    weights = data.get("weights")
    losses = data.get("losses")
    row = [1.0] * T if weights is None else list(weights)
    row += [math.nan if v is None else v for v in losses] if losses else [math.nan] * T
    if data.get("skipped"):
        layout = Layout(tasks, (), "", "", False, CONFLICT_COSINE, bool(losses))
        return layout, data.get("skip_reason") or "skipped", row
    layers = _layers(data)
    layout = Layout(
        tasks,
        tuple((name, int(d.get("num_params", 0)), d.get("route", "")) for name, d in layers.items()),
        data.get("engine", ""),
        data.get("strategy", ""),
        data.get("approximate", False),
        float(data.get("threshold", 0.0)),
        bool(losses),
        data.get("sync", ""),
    )
    row += [x for r in data["gram"] for x in r]
    row += [x for d in layers.values() for r in d["gram"] for x in r]
    return layout, "", row


def _layers(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """A checked line's layers, bottom to top: as the line lists them, or, on a line of schema 1 (which listed
    them as the backward reached them, top first), in natural order of the names, as they were read then."""
    layers = data.get("layers", {})
    schema = data.get("schema")
    if isinstance(schema, int) and schema >= _LAYERS_IN_ORDER:
        return layers
    return dict(sorted(layers.items(), key=lambda item: natural_key(item[0])))


def _packed(values: list[list[Any]], wheres: list[str]) -> Tensor:
    """The rows as one float64 tensor; a value that is not a number is named by its line."""
    try:
        return torch.tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        for row, where in zip(values, wheres):
            try:
                torch.tensor(row, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError) as err:
                raise _not_a_line(where, f"{type(err).__name__}: {err}") from err
        raise


def _not_a_line(where: str, what: str) -> ValueError:
    return ValueError(
        f"{where} is not a gradconflict history line: {what}; write histories with History.to_jsonl() or a JSONLSink"
    )


def _report(data: Any, where: str) -> ConflictReport:
    """One line's report, after :func:`_check`: a wrong field is a ``ValueError`` that names it, never an error
    deep inside the diagnosis."""
    bad = _check(data, where)
    try:
        return ConflictReport.from_dict({**data, "layers": _layers(data)})
    except (KeyError, ValueError, TypeError) as err:
        raise bad(f"{type(err).__name__}: {err}") from err


def _check(data: Any, where: str) -> Callable[[str], ValueError]:
    """Check the shape of every field :meth:`ConflictReport.from_dict` reads (a value that is not a number is
    found where the numbers are read, named by the same message); returns the message maker for this line."""

    def bad(what: str) -> ValueError:
        return _not_a_line(where, what)

    if not isinstance(data, Mapping):
        raise bad(f"a JSON {type(data).__name__}, not an object")
    schema = data.get("schema")
    if isinstance(schema, int) and schema > LINE_SCHEMA:
        raise ValueError(
            f"{where} was written with history schema {schema}, newer than the schema this gradconflict reads "
            f"({LINE_SCHEMA}): upgrade gradconflict to read it"
        )
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise bad(f"'tasks' must be a non-empty list of names, got {tasks!r}")
    T = len(tasks)
    step = data.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise bad(f"'step' must be an integer, got {step!r}")

    # Shapes here; a value that is not a number fails where the numbers are read, named by the same message.
    def vector(key: str, value: Any) -> None:
        if not (isinstance(value, list) and len(value) == T):
            raise bad(f"'{key}' must be a list of {T} numbers (one per task), got {value!r}")

    if data.get("weights") is not None:
        vector("weights", data["weights"])
    if data.get("losses"):
        vector("losses", data["losses"])
    if not data.get("skipped"):
        _matrix(data.get("gram"), T, "'gram'", bad)
        layers = data.get("layers", {})
        if not isinstance(layers, Mapping):
            raise bad(f"'layers' must be an object {{layer name: layer}}, got a {type(layers).__name__}")
        for name, layer in layers.items():
            if not isinstance(layer, Mapping):
                raise bad(f"layer {name!r} must be an object, got a {type(layer).__name__}")
            _matrix(layer.get("gram"), T, f"the 'gram' of layer {name!r}", bad)
    return bad


def _matrix(value: Any, T: int, what: str, bad: Any) -> None:
    if not (isinstance(value, list) and len(value) == T and all(isinstance(r, list) and len(r) == T for r in value)):
        raise bad(f"{what} must be a {T} x {T} matrix of numbers (T = {T} tasks)")

"""Inbox files: their paths in the forms Spark names them (``_metadata.file_path`` and a checkpoint's
file list hold URIs, ``file:///a/b%20c``; the inbox watch and the checks plain paths), the names of
the copies the inbox watch makes of changed files, and which files the file source took into each
micro-batch (its log in the query's checkpoint)."""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse


def local_path(uri: str) -> str:
    """``file:///a/b%20c`` as ``/a/b c``; a plain path as it is."""
    if uri.startswith("file:///") and "%" not in uri and "?" not in uri and "#" not in uri:
        return uri[7:]  # the usual local URI, read a million times at a start (urlparse: 4 µs each)
    return unquote(urlparse(uri).path) if "://" in uri or uri.startswith("file:") else uri


def file_name(path: str) -> str:
    """An inbox file's name from Spark's ``_metadata.file_path`` (a URI) or a plain path."""
    return Path(local_path(path)).name


#: A copy the inbox watch made of a changed inbox file: ``<stem>.changed-<mtime_ms><suffix>``.
_COPY = re.compile(r"^(?P<stem>.+)\.changed-(?P<ms>\d+)(?P<suffix>\.[^./]*)?$")


def copy_name(path: Path, mtime_ms: int) -> Path:
    """The copy of inbox file ``path`` as it was at modification time ``mtime_ms`` (ms), beside it."""
    return path.with_name(f"{path.stem}.changed-{mtime_ms}{path.suffix}")


def copy_origin(path: str) -> tuple[str, int] | None:
    """(the inbox file it copies, the modification time in ms it copies it at) when ``path`` (a plain
    path or a URI) names a copy the inbox watch made (:func:`copy_name`), else None."""
    local = Path(local_path(path))
    m = _COPY.match(local.name)
    if m is None:
        return None
    return str(local.with_name(m["stem"] + (m["suffix"] or ""))), int(m["ms"])


def _log_offset(checkpoint: Path, batch_id: int) -> int | None:
    """The file source's offset (its own batch id) the query's offset log holds for ``batch_id``."""
    try:
        lines = (checkpoint / "offsets" / str(batch_id)).read_text(encoding="utf-8").splitlines()
        return int(json.loads(lines[2])["logOffset"])
    except (OSError, IndexError, ValueError, KeyError, TypeError):
        return None


def source_entries(checkpoint: Path, batch_id: int) -> list[tuple[str, int]] | None:
    """The inbox files Spark's file source took into the query's micro-batch ``batch_id``, as (local
    path, modification time in ms when listed), in the order listed. None when the checkpoint has no
    entry for them.

    The query's batch ``b`` reads the file source's own batches after the offset of ``b - 1`` up to
    the offset of ``b`` (``offsets/<b>``). Mostly that is the one source batch ``b``, but not after a
    crash between the source's listing (``sources/0/<n>`` written) and the query's offset log: the
    restarted source lists again, and the query's next batch takes both listings (two source batches,
    and every later query batch is one behind its source batch)."""
    hi = _log_offset(checkpoint, batch_id)
    if hi is None:
        return source_log_entries(checkpoint, batch_id)
    lo = -1 if batch_id == 0 else _log_offset(checkpoint, batch_id - 1)
    found = [e for n in (range(lo + 1, hi + 1) if lo is not None else [hi])
             if (e := source_log_entries(checkpoint, n)) is not None]
    return [entry for entries in found for entry in entries] if found else None


def in_arrival_order(entries: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """``entries`` ((path, modification time in ms), in the order the file source took them) with the
    files of each run of one modification time in the order of their names. Spark sorts a listing by
    modification time, and files written within one millisecond (a backlog copied in bulk; a file
    system or object store that keeps whole seconds) tie: it leaves them in its listing's order,
    which no reader can reproduce. By name, they come in one order every time."""
    return [e for _, run in itertools.groupby(entries, key=lambda e: e[1]) for e in sorted(run)]


def source_log_entries(checkpoint: Path, source_batch: int) -> list[tuple[str, int]] | None:
    """The entry of the file source's own batch ``source_batch`` in its log (``sources/0/<id>``, or
    ``<id>.compact``, which every tenth batch holds the entries of all batches so far in), as
    (local path, modification time in ms when listed). None when there is no such entry."""
    folder = checkpoint / "sources" / "0"
    for name in (str(source_batch), f"{source_batch}.compact"):
        try:
            text = (folder / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        tag = f'"batchId":{source_batch}'
        entries = (json.loads(line) for line in text.splitlines()[1:] if tag in line)
        return [(local_path(e["path"]), int(e.get("timestamp", -1))) for e in entries
                if e.get("batchId") == source_batch]
    return None


def source_log_all(checkpoint: Path) -> dict[str, int]:
    """Every inbox file the file source's log lists, as local path -> modification time in ms when
    listed, in the order the source took them. The log's latest ``<id>.compact`` holds the entries of
    every batch up to ``id`` (Spark deletes the batch files before it); the batch files after it hold
    the rest."""
    folder = checkpoint / "sources" / "0"
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return {}
    batches = sorted(int(n) for n in names if n.isdigit())
    compacts = sorted(int(n.split(".")[0]) for n in names if n.endswith(".compact") and n.split(".")[0].isdigit())
    start = compacts[-1] if compacts else -1
    files: dict[str, int] = {}
    for name in ([f"{start}.compact"] if compacts else []) + [str(b) for b in batches if b > start]:
        try:
            text = (folder / name).read_text(encoding="utf-8")
        except FileNotFoundError:  # removed by the log's clean-up meanwhile: its entries are compacted
            continue
        for line in text.splitlines()[1:]:
            if line.strip():
                e = json.loads(line)
                path = local_path(e["path"])
                files.pop(path, None)
                files[path] = int(e.get("timestamp", -1))
    return files

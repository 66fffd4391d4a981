"""A damaged Delta table, told as one error: which table, which file, what is wrong, how to get it back.

When a file of a table's log (``_delta_log/<version>.json``, a checkpoint) or one of its data files
is missing, cut short or overwritten, Spark fails the job with a long Java trace, and a streaming
query that hits it fails with a trace tens of kilobytes long. :func:`explain` reads such an error's
text, finds the table the file belongs to (by its path under the data root; for a gap in the log,
whose error names no file, by looking for the gap in each table's log) and turns it into a
:class:`DamagedTable` whose message names the file and the fix for that table's layer:

* bronze, silver and ``gold_too_late_events`` are built from the inbox files, which the stream
  keeps: ``lakehouse stream --reset`` rebuilds them (and gold after them);
* the other gold tables are computed from silver: remove the table's folder and ``lakehouse
  backfill`` the days it held (``lakehouse mirror`` then reloads its Postgres copy, which notices the
  new table);
* ``risk_scores``: remove the folder and ``lakehouse score`` the days again.

One damage Spark does not report: a commit file left empty by a power loss, which Delta reads as a
commit of nothing. :func:`check_log` looks for it (and for commit files cut short or missing) in Python,
before a reader starts: the stream, the backfill and the mirror call it.

A backup of the folder is the first fix in every case. Nothing here repairs a table: a log entry
cut short may have lost rows that only a rebuild brings back.

A file the OS will not let the jobs read or write (a folder another user owns, a read-only file
system) is not damage, though Java words it alike (``FileNotFoundException: ... (Permission
denied)``): :func:`refused` tells it as :class:`AccessRefused`, and :func:`explain` never takes it for
a damaged table, whose fixes would rebuild tables that are whole.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from lakehouse.config import TABLES, Settings

#: The reason given for a file that is gone.
MISSING = "it is missing"
#: Error texts that mean a file of a table cannot be read (Spark's and Delta's error classes, and the
#: Java exceptions under them), each with the words the message gives the user.
_REASONS: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), why) for p, why in (
    (r"ChecksumException", "its checksum does not match its content: it was changed or cut short"),
    (r"JsonEOFException|Unexpected end-of-input", "it is cut short (its JSON ends mid-record)"),
    (r"MALFORMED_RECORD_IN_PARSING|JsonParseException|JsonMappingException", "it is not valid JSON"),
    (r"is not a Parquet file|ParquetDecodingException|CorruptedParquet", "it is not a readable Parquet file"),
    (r"DELTA_TRUNCATED_TRANSACTION_LOG", "the log's first commits are gone and no checkpoint stands in for them"),
    (r"FILE_NOT_EXIST|FileNotFoundException|DELTA_FILE_NOT_FOUND|DELTA_LOG_FILE_NOT_FOUND|does not exist",
     MISSING),
    (r"FAILED_READ_FILE", "it cannot be read"),
))
#: Damage whose error names no file: the table is found by its log (:func:`log_gap`).
_GAP = re.compile(r"DELTA_VERSIONS_NOT_CONTIGUOUS|Versions \(.*\) are not contiguous")
#: Where a file's path ends in an error text.
_END = r"[^\s'\"`\],;:)]*"


class DamagedTable(RuntimeError):
    """A Delta table's log or data files cannot be read; the message names the table, the file and the fix."""

    def __init__(self, table: str, path: Path, file: str | None, reason: str):
        self.table, self.path, self.file, self.reason = table, path, file, reason
        what = f"{file}: {reason}" if file else reason
        super().__init__(f"The Delta table {table} at {path} is damaged: {what}. Fix: {fix_for(table)}")


class AccessRefused(RuntimeError):
    """The OS refused the jobs a file or folder under the data folder; the message names it and the fix."""

    def __init__(self, path: Path, why: str, settings: Settings):
        self.path, self.why = path, why
        root = settings.data_root
        fix = ("move that file away" if "a file is in" in why else
               f"give your user that folder back (e.g. `chown -R $(id -un) {root}`) and make it writable")
        super().__init__(
            f"the OS refused the jobs {path}: {why}. It is under the data folder {root} (LAKEHOUSE_DATA), and "
            f"nothing is damaged: {fix}, or set LAKEHOUSE_DATA to another folder; then run the command again "
            "(the stream resumes from its checkpoint).")


#: The OS's words for a refused access, as Python's OSError and Java's exceptions give them.
_DENIED = ("Permission denied", "Operation not permitted", "Read-only file system", "AccessDeniedException",
           "ReadOnlyFileSystemException")
#: The OS's words for a limit of the machine a write or an open ran into (a full disk, a quota, the
#: open-file limit): Java words them like a missing file too (``FileNotFoundException: ... (Too many
#: open files)``), and the command's own message says what to do (``lakehouse.cli``).
DISK_FULL = ("No space left on device", "Disk quota exceeded")
OPEN_FILES = "Too many open files"
MACHINE_LIMITS = (*DISK_FULL, OPEN_FILES)
#: The errno names of a refused write in Python: no permission, a read-only file system, a file in the
#: place of a folder (EEXIST only then: a folder made twice is the code's doing).
_REFUSED_ERRNO = {"EACCES": None, "EPERM": None, "EROFS": None,
                  "ENOTDIR": "a file is in the place of one of its folders", "EEXIST": "a file is in its place"}


def refused(exc: BaseException, settings: Settings) -> AccessRefused | None:
    """``exc`` as an :class:`AccessRefused` when the OS refused a file or folder under the data folder
    (a Python OSError, or a Java exception however deep in the trace); else None."""
    import errno

    if isinstance(exc, AccessRefused):
        return exc
    root = Path(os.path.realpath(settings.data_root))
    roots = {str(settings.data_root).rstrip("/"), str(root).rstrip("/")}

    def under(path: Path) -> bool:
        return any(str(path) == r or str(path).startswith(r + "/") for r in roots)

    if isinstance(exc, OSError):
        code = errno.errorcode.get(exc.errno or 0)
        for name in (exc.filename, exc.filename2):
            if code in _REFUSED_ERRNO and isinstance(name, (str, Path)) and under(Path(name)) \
                    and not (code == "EEXIST" and Path(name).is_dir()):
                return AccessRefused(Path(name), _REFUSED_ERRNO[code] or exc.strerror, settings)
    text = full_text(exc)
    words = next((w for w in _DENIED if w in text), None)
    if words is None:
        return None
    why = {"AccessDeniedException": "Permission denied",
           "ReadOnlyFileSystemException": "Read-only file system"}.get(words, words)
    # Java: `FileNotFoundException: PATH (Permission denied)`, `AccessDeniedException: PATH`; else the
    # first path under the data folder the text names
    for r in sorted(roots, key=len, reverse=True):
        for m in re.finditer(re.escape(r) + _END, text):
            if under(Path(m.group(0))):
                return AccessRefused(Path(m.group(0).rstrip(".")), why, settings)
    return None


def fix_for(table: str) -> str:
    """How to get ``table`` back, by what it is built from."""
    backup = "restore the table's folder from a backup"
    if table == "risk_scores":
        return (f"{backup}, or remove the folder and score the days it held again with `lakehouse score "
                f"--from DAY --to DAY` (then `lakehouse mirror`).")
    layer = TABLES[table][0]
    if layer == "gold" and table != "gold_too_late_events":
        return (f"{backup}, or remove the folder and recompute it from silver with `lakehouse backfill "
                f"--from DAY --to DAY` over the days it held (then `lakehouse mirror` reloads its Postgres copy).")
    return (f"{backup}, or rebuild bronze, silver and gold from the inbox files (the stream keeps them) "
            f"with `lakehouse stream --reset`.")


def _reason(text: str) -> str | None:
    return next((why for pattern, why in _REASONS if pattern.search(text)), None)


def find(text: str, tables: dict[str, Path]) -> DamagedTable | None:
    """The damaged table an error ``text`` is about, or None when it is not about a damaged table. Pure.

    Args:
        text: the error's text, Java causes and all.
        tables: every table's folder, by name (``Settings.table_path``).
    """
    reason = _reason(text)
    if reason is None:
        return None
    hits = []  # (where in the text, -len(folder), table, folder, file)
    for name, path in tables.items():
        folder = str(path).rstrip("/")
        for quoted in {folder, folder.replace(" ", "%20")}:
            for m in re.finditer(re.escape(quoted) + "/" + _END, text):
                file = m.group(0)[len(quoted) + 1:].rstrip(".").replace("%20", " ")
                hits.append((m.start(), -len(folder), name, Path(folder), file))
    if not hits:
        return None
    _, _, name, folder, file = min(hits)  # the first file named; of nested folders, the deepest
    return DamagedTable(name, folder, file or None, reason)


def log_gap(path: Path) -> tuple[int, int] | None:
    """The first gap ``(after, before)`` among the commit files a reader of ``path`` needs: those after the
    last checkpoint (all of them without one). None when they are contiguous or there is no log."""
    log_dir = Path(path) / "_delta_log"
    try:
        names = os.listdir(log_dir)
    except OSError:
        return None
    versions = sorted(int(n[:20]) for n in names if len(n) == 25 and n.endswith(".json") and n[:20].isdigit())
    checkpoints = [int(n[:20]) for n in names if ".checkpoint" in n and n[:20].isdigit()]
    start = max(checkpoints, default=-1)
    needed = [v for v in versions if v > start]
    expected = start + 1
    for v in needed:
        if v != expected:
            return expected - 1, v
        expected = v + 1
    return None


#: An empty log file: written and renamed, its content lost (ext4 and others can leave such a file
#: after a power loss, as neither Hadoop's local file system nor Delta syncs it to disk).
EMPTY = ("it is empty: its content never reached the disk (the machine lost power or crashed right after it "
         "was written)")
#: ... and for a commit, what Delta would make of it.
EMPTY_COMMIT = f"{EMPTY}; Delta would read it as a commit of nothing and lose its rows without a word"


def check_log(name: str, path: Path, since: int | None = None, until: int | None = None) -> DamagedTable | None:
    """The first damage in the commit files a reader of table ``name`` needs, found in Python before
    Spark reads them; None when there is none (or no table).

    Delta reads an empty commit file as a commit that changed nothing: after a power loss, a file
    renamed into the log but never written to disk (ext4 and others can leave it empty) loses that
    commit's rows without an error, and the Postgres mirror, reading the change data feed, would
    record the version as applied. So every commit file from ``since`` (default: the checkpoint a
    snapshot of ``until`` starts from, the last one at or before it) to ``until`` (default: the latest)
    must be there, not empty, and JSON on every line; so must that checkpoint's file be there and not
    empty. Spark finds the rest (:func:`find`).
    """
    from lakehouse.io import delta

    log_dir = Path(path) / "_delta_log"
    latest = delta.table_version(path) if until is None else until
    if latest is None:
        return None
    checkpoint = delta.last_checkpoint_version(log_dir)
    if checkpoint is not None and until is not None and checkpoint > until:  # time travel: the one before
        older = [int(e.name[:20]) for e in os.scandir(log_dir)
                 if ".checkpoint" in e.name and e.name[:20].isdigit() and int(e.name[:20]) <= until]
        checkpoint = max(older, default=None)
    if checkpoint is not None and since is None:
        parts = [e for e in os.scandir(log_dir) if e.name.startswith(f"{checkpoint:020d}.checkpoint")]
        if not parts:
            return DamagedTable(name, Path(path), "_delta_log/_last_checkpoint",
                                f"it names the checkpoint of version {checkpoint}, which is missing")
        for e in parts:
            if e.stat().st_size == 0:
                return DamagedTable(name, Path(path), f"_delta_log/{e.name}", EMPTY)
    start = since if since is not None else (checkpoint + 1 if checkpoint is not None else 0)
    for version in range(max(start, 0), latest + 1):
        file = log_dir / f"{version:020d}.json"
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            return DamagedTable(name, Path(path), f"_delta_log/{file.name}", MISSING)
        if not data.strip():
            return DamagedTable(name, Path(path), f"_delta_log/{file.name}", EMPTY_COMMIT)
        n = first_line_not_json(data.splitlines())
        if n is not None:
            return DamagedTable(name, Path(path), f"_delta_log/{file.name}",
                                f"it is cut short or overwritten (line {n} is not JSON)")
    return None


def first_line_not_json(lines, start: int = 1, skip: tuple[str, ...] = ()) -> int | None:
    """The number (counted from ``start``) of the first of ``lines`` (str or bytes) that is not a JSON
    value, blank lines and those in ``skip`` left aside; None when every one is. The logs of Delta and
    of Spark's checkpoints hold a JSON value per line."""
    for n, line in enumerate(lines, start=start):
        text = line.decode("utf-8", errors="replace").strip() if isinstance(line, bytes) else line.strip()
        if not text or text in skip:
            continue
        try:
            json.loads(line)
        except ValueError:
            return n
    return None


def check_tables(settings: Settings, names=None) -> None:
    """:func:`check_log` on every table of ``names`` (default: all) that exists; raises the first
    :class:`DamagedTable`."""
    for name in names or TABLES:
        damaged = check_log(name, settings.table_path(name))
        if damaged is not None:
            raise damaged


def full_text(exc: BaseException) -> str:
    """The error's whole text: its own, then its causes' (a query's failure wraps the batch's)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def explain(exc: BaseException, settings: Settings) -> DamagedTable | None:
    """``exc`` as a :class:`DamagedTable` when a file of one of the project's tables caused it, else None."""
    if isinstance(exc, DamagedTable):
        return exc
    if refused(exc, settings) is not None:  # worded like a missing file by Java, but nothing is damaged
        return None
    text = full_text(exc)
    if any(words in text for words in MACHINE_LIMITS):  # the machine's limit, not the table's damage
        return None
    tables = {name: Path(os.path.realpath(settings.table_path(name))) for name in TABLES}
    found = find(text, tables) or find(text, {n: settings.table_path(n) for n in TABLES})
    if found is not None or not _GAP.search(text):
        return found
    for name, path in tables.items():
        gap = log_gap(path)
        if gap is not None:
            after, before = gap
            missing = f"version {after + 1}" if before == after + 2 else f"versions {after + 1} to {before - 1}"
            return DamagedTable(name, path, None, f"its log lacks the commit files of {missing}")
    return None

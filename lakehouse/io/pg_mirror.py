"""Idempotent, exactly-once mirror of row batches (Delta versions, stream batches) into Postgres tables.

One call of :func:`upsert_batch` applies one batch in **one Postgres transaction**:

1. ``pg_advisory_xact_lock`` on (schema, source, table): concurrent writers of the same mirror queue up.
2. Ledger check: if ``<schema>._mirror_ledger`` says ``(source, table)`` already applied a version
   ``>= version``, nothing is written and 0 is returned (a replayed batch, or a retry whose first try
   committed but lost its acknowledgement).
3. ``COPY`` the rows (Postgres' binary format, written from Arrow by pgpq; CSV written by pyarrow when a
   column's Arrow and Postgres types do not pair up, see :func:`_copy_data`) into a ``TEMP`` staging table
   (``LIKE target INCLUDING DEFAULTS ... ON COMMIT DROP``, plus an ordinal column). An empty target (a
   first load, a rebuilt table) gets the rows by one ``COPY`` straight into it instead, skipping steps 3
   and 4; should a key repeat among the rows, that COPY is rolled back to a savepoint and the rows take
   the path below. A large first load (``BULK_LOAD_ROWS`` rows or more) drops the target's primary key
   and indexes inside that savepoint and builds them after the COPY: one sort per index instead of
   millions of single inserts (4.8M window rows: 41 s -> 27 s). It needs the table's exclusive lock,
   which it waits ``BULK_LOCK_TIMEOUT`` for (readers of an empty table hold it briefly); without it
   the rows are copied with the indexes in place.
4. ``INSERT INTO target SELECT DISTINCT ON (key) ... ORDER BY key, ordinal DESC`` (the last row of a key
   wins) ``ON CONFLICT (key) DO UPDATE SET <every non-key column> = EXCLUDED.<column>`` ``WHERE`` the
   stored row ``IS DISTINCT FROM`` the new one, so unchanged rows are not rewritten.
5. Optional deletes by key (COPY of the keys into a second staging table, then ``DELETE ... USING``).
   Deletes run after the upsert, so a key both upserted and deleted in one batch ends up deleted.
6. Upsert of the ledger row ``(source, table, version, rows, now(), source_id)``; ``COMMIT``. A
   ``source_id`` other than the ledger's (a Delta table deleted and created again) makes the batch a
   replacement: the table's rows are deleted first, in the same transaction, whatever the versions.

The data and the ledger commit together, so a batch is applied exactly once however often it is
retried, and a failure anywhere leaves both untouched. The ledger's word holds only while nothing else
writes the tables: a statement-level trigger on each of them (:data:`FOREIGN_WRITE`) deletes its ledger
entries, and warns the writer, when an ``INSERT``, ``UPDATE`` or ``DELETE`` runs in a transaction that
is not the mirror's own (those set :data:`WRITER_SETTING`); an ``AFTER TRUNCATE`` trigger
(:data:`FORGET`) does the same for ``TRUNCATE``, and a dropped table loses its entries when it is
created again. A source's next batch must then be the whole source (:mod:`lakehouse.mirror` reads the
snapshot, and ``upsert_batch(whole=True)`` also deletes the rows it does not hold). A third trigger
(:data:`FOREIGN_LOCK`) makes such a write and a batch being applied to the table wait for each other,
so a forget is never lost under a batch's commit.

:func:`with_retries` runs such a call with a fresh connection per attempt and exponential back-off
while Postgres is unreachable.

Value conversion (pandas ``DataFrame`` or pyarrow ``Table`` in, target column types from
:class:`MirrorTable`):

* nulls (``None``, ``NaN``, ``NaT``, ``pd.NA``) become SQL ``NULL``; float ``NaN`` is ``NULL`` too;
  ``inf``/``-inf`` are kept (float columns accept them);
* timezone-aware timestamps are written as UTC instants; naive timestamps are taken as UTC (the
  transaction runs with ``TIME ZONE 'UTC'``); precision is truncated to microseconds (Postgres' own);
* floats holding whole numbers (a pandas int column with a missing value) are cast back to integers
  for integer target columns (a fractional value raises);
* text is quoted CSV (commas, quotes, newlines, unicode are safe); empty strings stay empty strings,
  distinct from ``NULL``; bytes go to ``bytea`` as hex. Text containing NUL (``\\x00``) is rejected by
  Postgres itself. Nested values (lists, dicts) are not supported: serialize them (e.g. to JSON) first.

Column types in :class:`MirrorTable` are SQL written by the programmer (``"timestamptz"``,
``"double precision"``, ``"numeric(12,2)"``), not user input; names are always quoted identifiers.
Rows may carry extra columns (ignored) but must have every declared column.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from lakehouse.io import postgres

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Ledger table (one row per (source, table) mirrored into the schema).
LEDGER_TABLE = "_mirror_ledger"
#: The trigger (and its function) that makes the ledger forget a mirrored table emptied by ``TRUNCATE``.
FORGET = "_mirror_forget"
#: The trigger (and its function) that makes the ledger forget a mirrored table an ``INSERT``, ``UPDATE``
#: or ``DELETE`` wrote outside the mirror (by hand, say): its rows are no longer a version of the source.
FOREIGN_WRITE = "_mirror_foreign_write"
#: The trigger (and its function) that makes a write outside the mirror (``TRUNCATE`` too) wait for a
#: batch being applied to the table, and a batch wait for it (a shared advisory lock on the table, which
#: :func:`upsert_batch` takes exclusively): the forget of one is never lost under the other's commit.
FOREIGN_LOCK = "_mirror_foreign_lock"
#: The table in which a statement trigger on each mirrored table records the days of the rows any
#: ``DELETE`` removed (:attr:`MirrorTable.deleted_days`): ``(table_name, day, deleted_at)``, one row per
#: table and day, ``deleted_at`` the last such delete's transaction time. An incremental model that
#: recomputes the days whose input rows changed (each row's ``loaded_at``) reads it for the days whose
#: rows were only deleted, which leave no row behind to say so.
DELETED_DAYS_TABLE = "_mirror_deleted_days"
#: The trigger on each mirrored table that records them (its function: :meth:`MirrorTable.deleted_days_function`).
DELETED_DAYS = "_mirror_deleted_days"
#: The same function's ``BEFORE TRUNCATE`` trigger: a ``TRUNCATE`` has no transition table, so the days
#: are read from the table itself, before it is emptied.
TRUNCATED_DAYS = "_mirror_truncated_days"
#: The setting (``SET LOCAL``) that marks a transaction as the mirror's own: :data:`FOREIGN_WRITE` spares it.
WRITER_SETTING = "lakehouse.mirror_writer"
#: Ordinal column added to the staging table (keeps the last row of a duplicated key).
ORD_COLUMN = "_mirror_ord"
#: Postgres identifier length limit (bytes).
MAX_IDENTIFIER = 63
#: Bytes handed to the server per COPY data message.
COPY_CHUNK = 1 << 20
#: A first load into an empty table of at least this many rows builds the indexes after the COPY.
BULK_LOAD_ROWS = 100_000
#: How long a bulk first load waits for the table's exclusive lock before loading with indexes in place.
BULK_LOCK_TIMEOUT = "5s"

_INT_TYPES = re.compile(r"^(smallint|integer|int|bigint|int2|int4|int8|smallserial|serial|bigserial|"
                        r"serial2|serial4|serial8)$")


# ---- table definitions ------------------------------------------------------------------------
@dataclass(frozen=True)
class MirrorTable:
    """A mirrored Postgres table: ``name`` in the target schema, ordered ``columns`` as
    ``(column, postgres type)``, primary ``key`` columns and extra ``indexes`` (tuples of columns)."""

    name: str
    columns: tuple[tuple[str, str], ...]
    key: tuple[str, ...]
    indexes: tuple[tuple[str, ...], ...] = ()
    #: Optional ``timestamptz`` column set to ``now()`` whenever the mirror inserts or changes a row
    #: (not part of ``columns``; the source rows need not carry it). Freshness checks read it.
    loaded_at: str | None = None
    #: SQL expressions, each the ``date`` a deleted row marks as changed (null: none), over the deleted
    #: row as ``o``; ``{schema}`` stands for the table's schema (quoted). Written by the programmer,
    #: like the column types. A trigger records them in :data:`DELETED_DAYS_TABLE` at every ``DELETE``.
    deleted_days: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Accept lists (e.g. from config files) and store tuples, so instances stay hashable.
        object.__setattr__(self, "columns", tuple((str(c), str(t)) for c, t in self.columns))
        object.__setattr__(self, "deleted_days", (self.deleted_days,) if isinstance(self.deleted_days, str)
                           else tuple(str(e) for e in self.deleted_days))
        object.__setattr__(self, "key", (self.key,) if isinstance(self.key, str) else tuple(self.key))
        object.__setattr__(self, "indexes", tuple(((ix,) if isinstance(ix, str) else tuple(ix))
                                                  for ix in self.indexes))
        if not self.name:
            raise ValueError("MirrorTable needs a name")
        if not self.columns:
            raise ValueError(f"MirrorTable {self.name!r} has no columns")
        names = [c for c, _ in self.columns]
        dupes = sorted({c for c in names if names.count(c) > 1})
        if dupes:
            raise ValueError(f"MirrorTable {self.name!r}: duplicate columns {dupes}")
        if self.loaded_at and self.loaded_at in names:
            raise ValueError(f"MirrorTable {self.name!r}: loaded_at column {self.loaded_at!r} is also a data column")
        if ORD_COLUMN in names:
            raise ValueError(f"MirrorTable {self.name!r}: column name {ORD_COLUMN!r} is reserved")
        if not self.key:
            raise ValueError(f"MirrorTable {self.name!r} needs a primary key (key=...)")
        unknown = [c for c in (*self.key, *(c for ix in self.indexes for c in ix)) if c not in names]
        if unknown:
            raise ValueError(f"MirrorTable {self.name!r}: key/index columns {sorted(set(unknown))} are "
                             f"not among its columns {names}")
        if any(not ix for ix in self.indexes):
            raise ValueError(f"MirrorTable {self.name!r}: an index needs at least one column")

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.columns)

    @property
    def value_columns(self) -> tuple[str, ...]:
        """Non-key columns (the ones an upsert updates)."""
        return tuple(c for c, _ in self.columns if c not in self.key)

    def column_type(self, column: str) -> str:
        return dict(self.columns)[column]

    def index_name(self, columns: tuple[str, ...]) -> str:
        """``<table>_<cols>_idx``, shortened with a hash when longer than Postgres allows."""
        return _identifier(f"{self.name}_{'_'.join(columns)}", "_idx")

    @property
    def deleted_days_function(self) -> str:
        """The name of the function of this table's :data:`DELETED_DAYS` trigger."""
        return _identifier(f"{DELETED_DAYS}_{self.name}", "")


def _identifier(name: str, suffix: str) -> str:
    """``name + suffix``, its name part shortened with a hash when longer than Postgres allows."""
    if len(f"{name}{suffix}".encode()) <= MAX_IDENTIFIER:
        return f"{name}{suffix}"
    digest = hashlib.sha1(f"{name}{suffix}".encode()).hexdigest()[:10]
    head = name.encode()[:MAX_IDENTIFIER - len(digest) - len(suffix.encode()) - 1].decode(errors="ignore")
    return f"{head}_{digest}{suffix}"


# ---- transactions -----------------------------------------------------------------------------
@contextlib.contextmanager
def _transaction(conn) -> Iterator[Any]:
    """A cursor inside a transaction of its own: COMMIT on success, ROLLBACK on any exception.

    The connection must be idle (no transaction of the caller's in progress); autocommit connections
    are switched off for the duration and restored.
    """
    status = conn.info.transaction_status
    if status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
        raise RuntimeError("the connection has a transaction in progress; commit or roll it back before "
                           "mirroring (each mirror call runs in a transaction of its own)")
    was_autocommit = conn.autocommit
    if was_autocommit:
        conn.autocommit = False
    try:
        try:
            with conn.cursor() as cur:
                yield cur
        except BaseException:
            with contextlib.suppress(psycopg2.Error):
                conn.rollback()  # the connection may be gone (server down); the server rolls back then
            raise
        conn.commit()
    finally:
        if was_autocommit and not conn.closed:
            with contextlib.suppress(psycopg2.Error):
                conn.autocommit = True


def _as_writer(cur) -> None:
    """Start a writing transaction of the mirror's: UTC for naive timestamps, and marked as the
    mirror's own (:data:`WRITER_SETTING`), which the :data:`FOREIGN_WRITE` trigger spares."""
    cur.execute(f"SET LOCAL TIME ZONE 'UTC'; SET LOCAL {WRITER_SETTING} = 'on'")


def _lock_key(*parts: str) -> str:
    return "\x1f".join(("lakehouse.pg_mirror", *parts))


def _advisory_lock(cur, *parts: str) -> None:
    """Transaction-scoped advisory lock on ``parts`` (released at COMMIT/ROLLBACK)."""
    cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (_lock_key(*parts),))


def _qualified(schema: str, name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


def _idents(names: Iterable[str]) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(n) for n in names)


# ---- schema -----------------------------------------------------------------------------------
def ensure_schema(conn, schema: str, tables: Iterable[MirrorTable]) -> None:
    """Create ``schema``, the ledger and every table (with primary key and indexes) unless they exist.

    Idempotent and safe to run concurrently. A table that already exists gets any declared column it
    lacks (``ALTER TABLE ... ADD COLUMN``, nullable), and loses its ledger entries then: its rows have
    no value in that column until the next batch brings the whole source. Existing columns, types and
    keys are not changed.
    A table created while the ledger has entries for it (it was dropped) loses those entries: the
    next :func:`upsert_batch` must bring the whole source. So does a table emptied by ``TRUNCATE``, or
    written by an ``INSERT``, ``UPDATE`` or ``DELETE`` outside the mirror (two triggers on each table).
    Commits (runs in a transaction of its own).
    """
    tables = list(tables)
    with _transaction(conn) as cur:
        _advisory_lock(cur, "schema", schema)
        cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        if cur.fetchone() is None:
            cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        cur.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (source text NOT NULL, table_name text NOT NULL, "
            "version bigint NOT NULL, rows bigint NOT NULL DEFAULT 0, "
            "applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (source, table_name))"
        ).format(_qualified(schema, LEDGER_TABLE)))
        cur.execute("SELECT 1 FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
                    "AND column_name = 'source_id'", (schema, LEDGER_TABLE))
        if cur.fetchone() is None:  # a ledger from before the source's identity was kept
            cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS source_id text").format(
                _qualified(schema, LEDGER_TABLE)))
        cur.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (table_name text NOT NULL, day date NOT NULL, "
            "deleted_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (table_name, day))"
        ).format(_qualified(schema, DELETED_DAYS_TABLE)))
        functions = _trigger_functions(schema)
        functions.update({t.deleted_days_function: _deleted_days_body(schema, t) for t in tables if t.deleted_days})
        cur.execute("SELECT p.proname, p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                    "WHERE n.nspname = %s AND p.proname = ANY(%s) AND p.pronargs = 0 AND p.prosecdef",
                    (schema, list(functions)))
        made = dict(cur.fetchall())
        for name, body in functions.items():
            body = body.as_string(cur)
            if made.get(name) != body:  # missing, or made by an older release
                # SECURITY DEFINER: a role allowed to write the table may not be allowed the ledger.
                cur.execute(sql.SQL("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql "
                                    "SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS {}").format(
                    sql.Identifier(schema, name), sql.Literal(body)))
        for table in tables:
            _ensure_table(cur, schema, table)


def _trigger_functions(schema: str) -> dict[str, sql.Composable]:
    """The body of each trigger function of the mirrored tables (see :data:`FORGET`,
    :data:`FOREIGN_WRITE`, :data:`FOREIGN_LOCK`)."""
    ledger = _qualified(schema, LEDGER_TABLE)
    foreign = sql.SQL("coalesce(current_setting({}, true), '') <> 'on'").format(sql.Literal(WRITER_SETTING))
    return {
        FORGET: sql.SQL(" BEGIN DELETE FROM {} WHERE table_name = TG_TABLE_NAME; RETURN NULL; END ").format(ledger),
        FOREIGN_LOCK: sql.SQL(
            " BEGIN IF {} THEN PERFORM pg_advisory_xact_lock_shared(hashtextextended(concat_ws(chr(31), {}, "
            "'table', TG_TABLE_SCHEMA, TG_TABLE_NAME), 0)); END IF; RETURN NULL; END ").format(
            foreign, sql.Literal(_lock_key())),
        FOREIGN_WRITE: sql.SQL(
            " BEGIN IF {} THEN DELETE FROM {} WHERE table_name = TG_TABLE_NAME; "
            "IF FOUND THEN RAISE WARNING '%.% was written outside the lakehouse mirror (%): the mirror reloads "
            "it whole from its Delta table at its next round', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP; "
            "END IF; END IF; RETURN NULL; END ").format(foreign, ledger),
    }


def _deleted_days_body(schema: str, table: MirrorTable) -> sql.Composable:
    """The body of ``table``'s :data:`DELETED_DAYS` and :data:`TRUNCATED_DAYS` trigger function: the
    days of the deleted rows (the transition table ``_old``; for a ``TRUNCATE``, every row of the table,
    before it is emptied), each upserted into :data:`DELETED_DAYS_TABLE` with the time."""
    def day(expr: str) -> sql.Composable:  # "{schema}" as the quoted identifier, the rest as written
        parts = expr.split("{schema}")
        pieces = [p for part in parts[:-1] for p in (sql.SQL(part), sql.Identifier(schema))] + [sql.SQL(parts[-1])]
        return sql.SQL("(({})::date)").format(sql.Composed(pieces))

    days = sql.SQL(", ").join(day(expr) for expr in table.deleted_days)

    def record(rows: sql.Composable) -> sql.Composable:
        return sql.SQL(
            "INSERT INTO {} AS d (table_name, day, deleted_at) SELECT DISTINCT TG_TABLE_NAME, x.day, now() "
            "FROM {} AS o CROSS JOIN LATERAL (VALUES {}) AS x(day) WHERE x.day IS NOT NULL "
            "ON CONFLICT (table_name, day) DO UPDATE SET deleted_at = EXCLUDED.deleted_at;").format(
            _qualified(schema, DELETED_DAYS_TABLE), rows, days)

    # A day looked up in another table that is not there (not created yet, or dropped: the mirror loads
    # it whole, and its rows mark their days) is not known: the delete goes on without it.
    return sql.SQL(
        " BEGIN IF TG_OP = 'TRUNCATE' THEN {} ELSE {} END IF; RETURN NULL; "
        "EXCEPTION WHEN undefined_table THEN RAISE WARNING 'the days of the rows deleted from %.% are not "
        "recorded: %', TG_TABLE_SCHEMA, TG_TABLE_NAME, SQLERRM; RETURN NULL; END ").format(
        record(_qualified(schema, table.name)), record(sql.SQL("_old")))


#: Each table's triggers: (name, when, events); the function of each has the trigger's name.
_TRIGGERS = ((FORGET, "AFTER", "TRUNCATE"), (FOREIGN_WRITE, "AFTER", "INSERT OR UPDATE OR DELETE"),
             (FOREIGN_LOCK, "BEFORE", "INSERT OR UPDATE OR DELETE OR TRUNCATE"))


def _forget(cur, schema: str, table_name: str) -> list[tuple[str, int]]:
    """Delete the ledger entries of ``table_name`` (its next batch must be the whole source); returns
    the (source, version) pairs forgotten."""
    cur.execute(sql.SQL("DELETE FROM {} WHERE table_name = %s RETURNING source, version").format(
        _qualified(schema, LEDGER_TABLE)), (table_name,))
    return cur.fetchall()


def _empty_for_whole_load(cur, schema: str, table: MirrorTable, found: str, repair: str) -> None:
    """Empty ``table`` for a repair (what was ``found``, what the ``repair`` does), under its advisory
    lock, after a batch being applied to it has committed; the ledger forgets it, so its next batch
    loads it whole. Its TRUNCATE trigger records the days of the rows for the incremental marts."""
    _advisory_lock(cur, "table", schema, table.name)
    forgotten = _forget(cur, schema, table.name)
    log.warning("%s.%s%s: it is emptied, %s and loaded whole from its source (the ledger forgot %s)", schema,
                table.name, found, repair, ", ".join(f"{src} version {v}" for src, v in forgotten) or "nothing")
    cur.execute(sql.SQL("TRUNCATE {}").format(_qualified(schema, table.name)))


def _restore_key(cur, schema: str, table: MirrorTable, keyed: list[str], constraint: str | None) -> None:
    """Give ``table`` its primary key back: one dropped (or changed) by hand. Every upsert of the
    mirror, the publisher and the express lane names the key (``ON CONFLICT``) and fails without it,
    and rows written meanwhile may hold a key twice: the table is emptied, keyed again and forgotten by
    the ledger, so its next batch loads it whole."""
    target = _qualified(schema, table.name)
    _empty_for_whole_load(cur, schema, table, f" lost its primary key ({', '.join(table.key)})"
                          + (f", it has one on ({', '.join(keyed)}) instead" if keyed else ""), "keyed again")
    if constraint is not None:
        cur.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(target, sql.Identifier(constraint)))
    for column in table.key:  # a key column made nullable by hand
        cur.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL").format(target, sql.Identifier(column)))
    cur.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(target, _idents(table.key)))


def _ensure_table(cur, schema: str, table: MirrorTable) -> None:
    target = _qualified(schema, table.name)
    # Each column, whether it is in the table's primary key (none: NULL), and its type.
    cur.execute("SELECT a.attname, a.attnum = ANY(k.conkey), k.conname, a.atttypid::regtype::text "
                "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "LEFT JOIN pg_constraint k ON k.conrelid = c.oid AND k.contype = 'p' "
                "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped",
                (schema, table.name))
    rows = cur.fetchall()
    existing = {r[0] for r in rows}
    keyed = sorted(r[0] for r in rows if r[1])
    if not existing:
        cols = sql.SQL(", ").join(
            sql.SQL("{} {}{}").format(sql.Identifier(c), sql.SQL(t),
                                      sql.SQL(" NOT NULL") if c in table.key else sql.SQL(""))
            for c, t in table.columns)
        if table.loaded_at:
            cols = sql.SQL(", ").join([cols, sql.SQL("{} timestamptz NOT NULL DEFAULT now()").format(
                sql.Identifier(table.loaded_at))])
        cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))").format(
            target, cols, _idents(table.key)))
        # A ledger entry for a table that was not there: someone dropped it. Its versions are forgotten,
        # so the next batch loads the whole source again instead of only the changes after them.
        for source, version in _forget(cur, schema, table.name):
            log.warning("%s.%s was dropped after %s version %d was applied: it is created again and loaded "
                        "whole", schema, table.name, source, version)
    else:
        missing_keys = [c for c in table.key if c not in existing]
        if missing_keys:
            raise ValueError(f"{schema}.{table.name} exists without key columns {missing_keys}; migrate "
                             "or drop it (a primary key cannot be added by the mirror)")
        added = [(column, pgtype) for column, pgtype in table.columns if column not in existing]
        for column, pgtype in added:
            log.info("adding column %s %s to %s.%s", column, pgtype, schema, table.name)
            cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                target, sql.Identifier(column), sql.SQL(pgtype)))
        if added:
            # The rows already there hold no value in the new columns (a column the source gained, or
            # one dropped by hand): the ledger forgets the table, so its next batch brings every row;
            # after a batch being applied to it has committed (its ledger entry with it).
            _advisory_lock(cur, "table", schema, table.name)
            for source, version in _forget(cur, schema, table.name):
                log.warning("%s.%s lacked columns %s after %s version %d was applied: they are added and the "
                            "table is loaded whole", schema, table.name, ", ".join(c for c, _ in added), source,
                            version)
        if table.loaded_at and table.loaded_at not in existing:
            cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} timestamptz NOT NULL DEFAULT now()")
                        .format(target, sql.Identifier(table.loaded_at)))
    for columns in table.indexes:
        cur.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
            sql.Identifier(table.index_name(columns)), target, _idents(columns)))
    # TRUNCATE (someone emptying the table), or a row written by anything but the mirror, makes the
    # ledger forget it too, in the writer's transaction.
    cur.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND tgname = ANY(%s)",
                (target.as_string(cur), [t[0] for t in _TRIGGERS] + [DELETED_DAYS, TRUNCATED_DAYS]))
    triggers = {r[0] for r in cur.fetchall()}
    for name, when, events in _TRIGGERS:
        if name not in triggers:
            cur.execute(sql.SQL("CREATE TRIGGER {} {} {} ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}()").format(
                sql.Identifier(name), sql.SQL(when), sql.SQL(events), target, sql.Identifier(schema, name)))
    # Any DELETE (the mirror's or another's) records the days of the rows it removed.
    if table.deleted_days and DELETED_DAYS not in triggers:
        cur.execute(sql.SQL("CREATE TRIGGER {} AFTER DELETE ON {} REFERENCING OLD TABLE AS _old "
                            "FOR EACH STATEMENT EXECUTE FUNCTION {}()").format(
            sql.Identifier(DELETED_DAYS), target, sql.Identifier(schema, table.deleted_days_function)))
    # ... and so does a TRUNCATE (by hand, or the mirror's own when it puts a primary key back).
    if table.deleted_days and TRUNCATED_DAYS not in triggers:
        cur.execute(sql.SQL("CREATE TRIGGER {} BEFORE TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}()").format(
            sql.Identifier(TRUNCATED_DAYS), target, sql.Identifier(schema, table.deleted_days_function)))
    if existing and keyed != sorted(table.key):  # once its triggers are there: they record what it empties
        _restore_key(cur, schema, table, keyed, next((r[2] for r in rows if r[2]), None))
    if existing:
        _restore_types(cur, schema, table, {r[0]: r[3] for r in rows})


def _restore_types(cur, schema: str, table: MirrorTable, actual: dict[str, str]) -> None:
    """Give the columns of ``table`` whose type was changed by hand (or declared anew by a newer
    release) the declared type. The rows are COPYed through a staging table ``LIKE`` the target, so
    a column made ``integer`` fails every batch whose values have a fraction, and one made ``text``
    serves its numbers as strings. The table is emptied first (no cast of the rows there can fail)
    and forgotten by the ledger, so its next batch loads it whole. A column a view reads cannot
    change type: then a warning says which views, and the table is left as it is."""
    declared = [(c, t) for c, t in table.columns if c in actual]
    if table.loaded_at and table.loaded_at in actual:
        declared.append((table.loaded_at, "timestamptz"))
    # Postgres names "timestamptz" "timestamp with time zone"; a type modifier (numeric's precision) is
    # not compared. A name told apart here is asked of Postgres itself before anything is changed.
    suspects = [(c, t) for c, t in declared if actual[c] != _PG_NAMES.get(_base_type(t), _base_type(t))]
    if not suspects:
        return
    cur.execute("SELECT t::regtype::text FROM unnest(%s::text[]) WITH ORDINALITY AS d(t, i) ORDER BY i",
                ([t for _, t in suspects],))
    changed = [(c, t, actual[c]) for (c, t), (name,) in zip(suspects, cur.fetchall()) if actual[c] != name]
    if not changed:
        return
    target = _qualified(schema, table.name)
    what = ", ".join(f"{c} is {was}, not {t}" for c, t, was in changed)
    cur.execute("SELECT DISTINCT v.oid::regclass::text FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid "
                "JOIN pg_class v ON v.oid = r.ev_class JOIN pg_attribute a ON a.attrelid = d.refobjid "
                "AND a.attnum = d.refobjsubid WHERE d.refobjid = to_regclass(%s) AND v.oid <> d.refobjid "
                "AND a.attname = ANY(%s) ORDER BY 1", (target.as_string(cur), [c for c, _, _ in changed]))
    views = [r[0] for r in cur.fetchall()]
    if views:
        log.warning("%s.%s: %s; it keeps these types while views read those columns (%s): drop the views "
                    "(`DROP VIEW ... CASCADE`), the mirror then puts the declared types back and loads the table "
                    "whole, and `lakehouse dbt build` builds them again", schema, table.name, what,
                    ", ".join(views))
        return
    _empty_for_whole_load(cur, schema, table, f": {what}", "given the declared types")
    for column, pgtype, _ in changed:
        # The default (mirrored_at's now()) is set again after: one cast to another type may not cast back.
        name, default = sql.Identifier(column), column == table.loaded_at
        cur.execute(sql.SQL("ALTER TABLE {} {}ALTER COLUMN {} TYPE {} USING NULL{}").format(
            target, sql.SQL("ALTER COLUMN {} DROP DEFAULT, ").format(name) if default else sql.SQL(""), name,
            sql.SQL(pgtype), sql.SQL(", ALTER COLUMN {} SET DEFAULT now()").format(name) if default else sql.SQL("")))


#: Postgres' names (``format_type``) of the type names the mirror declares that it spells otherwise.
_PG_NAMES = {"timestamptz": "timestamp with time zone", "timestamp": "timestamp without time zone",
             "int": "integer", "int4": "integer", "int8": "bigint", "int2": "smallint", "float8": "double precision",
             "float4": "real", "bool": "boolean", "varchar": "character varying", "decimal": "numeric"}


def _base_type(pgtype: str) -> str:
    """A declared type without its modifier: ``numeric(12,2)`` -> ``numeric``."""
    return pgtype.split("(")[0].strip().lower()


# ---- ledger -----------------------------------------------------------------------------------
def _read_entry(cur, schema: str, source: str, table_name: str) -> tuple[int, str | None] | None:
    # source_id through to_jsonb: a ledger older than that column reads as None, not as an error
    cur.execute(sql.SQL("SELECT version, to_jsonb(l) ->> 'source_id' FROM {} AS l "
                        "WHERE source = %s AND table_name = %s").format(_qualified(schema, LEDGER_TABLE)),
                (source, table_name))
    row = cur.fetchone()
    return None if row is None else (int(row[0]), row[1])


def recreated(entry: tuple[int, str | None] | None, source_id: str | None) -> bool:
    """Whether the ledger ``entry`` (:func:`ledger_entry`) was made from another incarnation of the
    source than ``source_id``: it was deleted and created again, and its versions count anew. An
    unknown id on either side (an old ledger, a source without one) is taken for the same source."""
    return entry is not None and None not in (entry[1], source_id) and entry[1] != source_id


def applied_version(conn, schema: str, source: str, table_name: str) -> int | None:
    """The last version of ``source`` applied to ``table_name`` (None: never, or no ledger yet).

    Runs inside the caller's transaction when one is open, otherwise in a short one of its own.
    """
    entry = ledger_entry(conn, schema, source, table_name)
    return None if entry is None else entry[0]


def ledger_entry(conn, schema: str, source: str, table_name: str) -> tuple[int, str | None] | None:
    """(last version applied, the source's identity then: see :func:`upsert_batch`), or None."""
    def query(cur) -> tuple[int, str | None] | None:
        cur.execute("SELECT to_regclass(%s)", (sql.Identifier(schema, LEDGER_TABLE).as_string(conn),))
        if cur.fetchone()[0] is None:
            return None
        return _read_entry(cur, schema, source, table_name)

    if conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE:
        with _transaction(conn) as cur:
            return query(cur)
    with conn.cursor() as cur:
        return query(cur)


def held_versions(conn, schema: str, entries: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int | None]:
    """The version the ledger holds for each ``(source, table)`` of ``entries``: None where it holds
    none (the table was never loaded, or Postgres forgot it: written outside the mirror, emptied) or
    the table is not there (dropped). One query; what a mirror that remembers the versions it applied
    checks before trusting its memory."""
    entries = list(entries)
    with _transaction(conn) as cur:
        cur.execute("SELECT to_regclass(%s)", (_qualified(schema, LEDGER_TABLE).as_string(cur),))
        if cur.fetchone()[0] is None:
            return {e: None for e in entries}
        cur.execute(sql.SQL(
            "SELECT e.source, e.table_name, CASE WHEN to_regclass(format('%%I.%%I', %s::text, e.table_name)) "
            "IS NULL THEN NULL ELSE l.version END FROM unnest(%s::text[], %s::text[]) AS e(source, table_name) "
            "LEFT JOIN {} AS l ON l.source = e.source AND l.table_name = e.table_name").format(
            _qualified(schema, LEDGER_TABLE)), (schema, [e[0] for e in entries], [e[1] for e in entries]))
        held = {(r[0], r[1]): (None if r[2] is None else int(r[2])) for r in cur.fetchall()}
    return {e: held.get(e) for e in entries}


def _record_version(cur, schema: str, source: str, table_name: str, version: int, rows: int,
                    source_id: str | None = None) -> None:
    cur.execute(sql.SQL(
        "INSERT INTO {} AS l (source, table_name, version, rows, applied_at, source_id) "
        "VALUES (%s, %s, %s, %s, now(), %s) ON CONFLICT (source, table_name) DO UPDATE SET "
        "version = EXCLUDED.version, rows = EXCLUDED.rows, applied_at = EXCLUDED.applied_at, "
        "source_id = COALESCE(EXCLUDED.source_id, l.source_id)"
    ).format(_qualified(schema, LEDGER_TABLE)), (source, table_name, int(version), int(rows), source_id))


# ---- rows -> CSV ------------------------------------------------------------------------------
def _to_arrow(rows, columns: tuple[str, ...], what: str):
    """``rows`` (pandas DataFrame or pyarrow Table) as a pyarrow Table of exactly ``columns``."""
    import pyarrow as pa

    if isinstance(rows, pa.RecordBatch):
        rows = pa.Table.from_batches([rows])
    if isinstance(rows, pa.Table):
        present = rows.column_names
    else:
        import pandas as pd

        if not isinstance(rows, pd.DataFrame):
            raise TypeError(f"{what} must be a pandas DataFrame or a pyarrow Table, not "
                            f"{type(rows).__name__}")
        present = [str(c) for c in rows.columns]
    missing = [c for c in columns if c not in present]
    if missing:
        raise ValueError(f"{what} lacks columns {missing} (has {list(present)})")
    if isinstance(rows, pa.Table):
        return rows.select(list(columns))
    frame = rows.loc[:, list(columns)]
    try:
        return pa.Table.from_pandas(frame, preserve_index=False)  # NaN/None/NaT/pd.NA -> null
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise TypeError(f"{what}: cannot convert a column for Postgres ({exc}); give each column one "
                        "type (serialize nested values, e.g. to JSON text, first)") from exc


def _prepare_column(arr, pgtype: str, column: str):
    """One Arrow column, converted so its CSV text is what Postgres' ``pgtype`` parses exactly."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = arr.type
    base = pgtype.strip().lower()
    if pa.types.is_dictionary(t):
        arr = arr.cast(t.value_type)
        t = arr.type
    if pa.types.is_floating(t):
        if arr.null_count < len(arr):
            arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, t), arr)  # NaN -> NULL
        if _INT_TYPES.match(base):
            try:
                arr = arr.cast(pa.int64())  # safe cast: fractional values raise
            except pa.ArrowInvalid as exc:
                raise ValueError(f"column {column!r} ({pgtype}) has non-integer values: {exc}") from None
        elif pa.types.is_float16(t):
            arr = arr.cast(pa.float32())
    elif pa.types.is_timestamp(t):
        # Truncated to µs; a zoned one as its UTC wall time (its zone dropped: the transaction runs in
        # UTC), since pyarrow writes a zoned timestamp as CSV about 30 times slower.
        arr = arr.cast(pa.timestamp("us"), safe=False)
    elif pa.types.is_time(t) and t.unit == "ns":
        arr = arr.cast(pa.time64("us"), safe=False)
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        arr = pa.array([None if v is None else "\\x" + v.hex() for v in arr.to_pylist()], pa.string())
    elif pa.types.is_null(t):
        arr = pa.nulls(len(arr), pa.string())
    elif pa.types.is_nested(t):
        raise TypeError(f"column {column!r} ({pgtype}) holds nested values ({t}); serialize them (e.g. "
                        "to JSON text) first")
    return arr


@dataclass(frozen=True)
class CopyData:
    """Rows encoded for ``COPY ... FROM STDIN``: ``buf`` in ``format`` ("binary" or "csv"), ``rows`` of them."""

    buf: io.BytesIO
    rows: int
    format: str


def _binary_types() -> dict[str, Any]:
    """The Postgres types (as ``format_type`` names them) whose binary COPY form pgpq writes, each
    with the Arrow type it writes it from."""
    import pyarrow as pa

    stamp = pa.timestamp("us")
    return {"boolean": pa.bool_(), "smallint": pa.int16(), "integer": pa.int32(), "bigint": pa.int64(),
            "real": pa.float32(), "double precision": pa.float64(), "text": pa.string(), "date": pa.date32(),
            "timestamp with time zone": stamp, "timestamp without time zone": stamp}


def _binary_column(arr, pgtype: str | None):
    """``arr`` (a column after :func:`_prepare_column`) as the Arrow type pgpq writes ``pgtype``'s binary
    form from; None unless both are of one kind (integers of any width, a float of the same width, text,
    a date, a timestamp, a boolean) and the cast loses nothing. Anything else takes the CSV path, where
    Postgres parses the text as it always has (a number for a text column, an overflowing integer)."""
    import pyarrow as pa

    want = _binary_types().get(pgtype or "")
    if want is None:
        return None
    if arr.null_count == len(arr):
        return pa.nulls(len(arr), want)
    t = arr.type
    if pa.types.is_large_string(t) and want == pa.string():
        return arr  # pgpq writes it as text too; a cast could overflow its 32-bit offsets
    if not (t == want or (pa.types.is_integer(t) and pa.types.is_integer(want))
            or (pa.types.is_date(t) and pa.types.is_date(want))):
        return None
    try:
        return arr.cast(want)  # safe: an integer too large for the column is refused, not wrapped
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def _copy_data(rows, table: MirrorTable, columns: tuple[str, ...], what: str, with_ordinal: bool,
               pg_types: dict[str, str] | None = None) -> CopyData:
    """``columns`` of ``rows`` encoded for COPY. ``pg_types``: the target's columns as Postgres has them
    now (:func:`_column_types`); when every column pairs with its Arrow type (:func:`_binary_column`),
    Postgres' binary format (no number or timestamp printed and parsed again: 4.7M window rows are
    written in about 0.9 s instead of 2-3 and loaded in 4-6 s instead of 8), else CSV (every non-null
    value quoted, NULL = empty unquoted field)."""
    import numpy as np
    import pyarrow as pa

    data = _to_arrow(rows, columns, what)
    arrays = [_prepare_column(data.column(c), table.column_type(c), c) for c in columns]
    names = list(columns)
    if with_ordinal:
        arrays.append(pa.array(np.arange(data.num_rows, dtype=np.int64)))
        names.append(ORD_COLUMN)
    buf = io.BytesIO()
    if not data.num_rows:
        return CopyData(buf, 0, "csv")
    types = {**(pg_types or {}), ORD_COLUMN: "bigint"}
    binary = [_binary_column(arr, types.get(name)) for arr, name in zip(arrays, names)] if pg_types else None
    if binary is not None and all(arr is not None for arr in binary):
        from pgpq import ArrowToPostgresBinaryEncoder

        prepared = pa.Table.from_arrays(binary, names=names)
        encoder = ArrowToPostgresBinaryEncoder(prepared.schema)
        buf.write(encoder.write_header())
        for batch in prepared.to_batches():
            buf.write(encoder.write_batch(batch))
        buf.write(encoder.finish())
        fmt = "binary"
    else:
        import pyarrow.csv as pacsv

        pacsv.write_csv(pa.Table.from_arrays(arrays, names=names), buf,
                        pacsv.WriteOptions(include_header=False, quoting_style="all_valid"))
        fmt = "csv"
    buf.seek(0)
    return CopyData(buf, data.num_rows, fmt)


def _column_types(cur, relation: sql.Composable) -> dict[str, str] | None:
    """The columns of the table ``relation`` with their types, as Postgres has them now (``format_type``
    names without modifiers: a column changed by hand, and kept so while a view reads it, included).
    Asked once this transaction holds a lock on it (it created it, or read it), so no ``ALTER`` can
    change them before the COPY. None when the connection's client encoding is not UTF-8: a binary
    COPY's text is read in it (a CSV COPY names its own, ``ENCODING 'UTF8'``), so the rows go as CSV."""
    if getattr(cur.connection, "encoding", None) != "UTF8":
        return None
    cur.execute("SELECT attname, atttypid::regtype::text FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                "AND attnum > 0 AND NOT attisdropped", (relation.as_string(cur),))
    return dict(cur.fetchall())


def _copy(cur, target: sql.Composable, columns: Iterable[str], data: CopyData) -> None:
    cur.copy_expert(sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT {}{})").format(
        target, _idents(columns), sql.SQL(data.format),
        sql.SQL(", ENCODING 'UTF8'") if data.format == "csv" else sql.SQL("")).as_string(cur),
        data.buf, size=COPY_CHUNK)


def _copy_rows(cur, target: sql.Composable, table: MirrorTable, columns: tuple[str, ...], rows, what: str,
               with_ordinal: bool = False) -> None:
    """COPY ``columns`` of ``rows`` (and the ordinal, ``with_ordinal``) into ``target``, a table this
    transaction created (a staging table), in the format its column types as Postgres has them allow
    (:func:`_copy_data`): the types are asked of the very table the rows go into."""
    data = _copy_data(rows, table, columns, what, with_ordinal, pg_types=_column_types(cur, target))
    _copy(cur, target, (*columns, ORD_COLUMN) if with_ordinal else columns, data)


# ---- the batch --------------------------------------------------------------------------------
def _stage_rows(cur, schema: str, table: MirrorTable, rows) -> sql.Identifier | None:
    """COPY ``rows`` into a temporary staging table (dropped at commit); its name, None if no rows."""
    rows = _to_arrow(rows, table.column_names, "rows")
    if rows.num_rows == 0:
        return None
    stage = sql.Identifier(f"_mirror_stage_{table.name}"[:MAX_IDENTIFIER])
    cur.execute(sql.SQL("CREATE TEMP TABLE {} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP").format(
        stage, _qualified(schema, table.name)))
    cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} bigint").format(stage, sql.Identifier(ORD_COLUMN)))
    _copy_rows(cur, stage, table, table.column_names, rows, "rows", with_ordinal=True)
    return stage


def _load_empty(cur, schema: str, table: MirrorTable, rows) -> int | None:
    """COPY ``rows`` straight into the target when it is empty (a first load, a rebuilt table): no
    staging table, no sort for the last row per key, no conflict check. Returns the rows loaded, or
    None when the target holds rows or a key repeats in ``rows`` (the COPY is rolled back to its
    savepoint; the caller stages and merges, where the last row of a key wins)."""
    target = _qualified(schema, table.name)
    cur.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(target))
    if cur.fetchone()[0]:
        return None
    # Encoded before the savepoint: not while the bulk load holds the table's exclusive lock.
    data = _copy_data(rows, table, table.column_names, "rows", with_ordinal=False,
                      pg_types=_column_types(cur, target))  # locked by the SELECT above
    n = data.rows
    if n == 0:
        return 0
    cur.execute("SAVEPOINT lakehouse_mirror_load")
    try:
        dropped = _drop_indexes(cur, schema, table) if n >= BULK_LOAD_ROWS else None
        _copy(cur, target, table.column_names, data)
        if dropped:
            t0 = time.monotonic()
            for ddl in dropped:  # the primary key first: a repeated key fails it before the other sorts
                cur.execute(ddl)
            log.info("%s.%s: %d indexes built after the first load of %d rows in %.2f s", schema, table.name,
                     len(dropped), n, time.monotonic() - t0)
    except psycopg2.errors.UniqueViolation:
        cur.execute("ROLLBACK TO SAVEPOINT lakehouse_mirror_load")
        return None
    cur.execute("RELEASE SAVEPOINT lakehouse_mirror_load")
    return n


def _drop_indexes(cur, schema: str, table: MirrorTable) -> list[sql.Composable] | None:
    """Drop the primary key and every index of ``schema.table`` (inside the caller's savepoint) and
    return the statements that build them again, the primary key's first; None, with nothing
    dropped, when the table's exclusive lock is not granted within ``BULK_LOCK_TIMEOUT`` or something
    depends on an index (say a foreign key referencing the primary key)."""
    target = _qualified(schema, table.name)
    regclass = target.as_string(cur)
    cur.execute("SELECT current_setting('lock_timeout')")
    timeout = cur.fetchone()[0]
    cur.execute("SAVEPOINT lakehouse_mirror_indexes")
    try:
        cur.execute("SELECT set_config('lock_timeout', %s, true)", (BULK_LOCK_TIMEOUT,))
        cur.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(target))
        cur.execute("SELECT set_config('lock_timeout', %s, true)", (timeout,))
        cur.execute("SELECT c.conname, pg_get_constraintdef(c.oid), c.conindid FROM pg_constraint c "
                    "WHERE c.conrelid = %s::regclass AND c.contype IN ('p', 'u') ORDER BY c.contype",
                    (regclass,))
        constraints = cur.fetchall()
        cur.execute("SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i "
                    "WHERE i.indrelid = %s::regclass AND i.indexrelid <> ALL(%s) ORDER BY 1",
                    (regclass, [c[2] for c in constraints]))
        indexes = cur.fetchall()
        rebuild: list[sql.Composable] = []
        for name, definition, _ in constraints:
            cur.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(target, sql.Identifier(name)))
            rebuild.append(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(target, sql.Identifier(name))
                           + sql.SQL(definition))
        for name, definition in indexes:
            cur.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(name)))  # regclass text: schema-qualified, quoted
            rebuild.append(sql.SQL(definition))
    except (psycopg2.errors.LockNotAvailable, psycopg2.errors.DependentObjectsStillExist,
            psycopg2.errors.DeadlockDetected) as exc:
        cur.execute("ROLLBACK TO SAVEPOINT lakehouse_mirror_indexes")  # lock_timeout's SET LOCAL too
        log.info("%s.%s: first load with its indexes in place (%s)", schema, table.name,
                 str(exc).strip().splitlines()[0])
        return None
    cur.execute("RELEASE SAVEPOINT lakehouse_mirror_indexes")
    return rebuild


def _merge(cur, schema: str, table: MirrorTable, stage: sql.Identifier) -> int:
    """Upsert the staging table into the target (last row per key wins; no-op updates skipped)."""
    cols = _idents(table.column_names)
    key = _idents(table.key)
    query = sql.SQL("INSERT INTO {target} AS t ({cols}) SELECT DISTINCT ON ({key}) {cols} FROM {stage} "
                    "ORDER BY {key}, {ord} DESC ON CONFLICT ({key}) ").format(
        target=_qualified(schema, table.name), cols=cols, key=key, stage=stage,
        ord=sql.Identifier(ORD_COLUMN))
    values = table.value_columns
    if values:  # "(t.a, t.b) IS DISTINCT FROM (EXCLUDED.a, EXCLUDED.b)": skip updates that change nothing
        sets = [sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in values]
        if table.loaded_at:
            sets.append(sql.SQL("{} = now()").format(sql.Identifier(table.loaded_at)))
        query += sql.SQL("DO UPDATE SET {sets} WHERE ({old}) IS DISTINCT FROM ({new})").format(
            sets=sql.SQL(", ").join(sets),
            old=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in values),
            new=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in values))
    else:
        query += sql.SQL("DO NOTHING")
    cur.execute(query)
    return max(cur.rowcount, 0)


def _delete_absent(cur, schema: str, table: MirrorTable, stage: sql.Identifier | None) -> int:
    """Delete the target rows whose key is not in the staging table (every row when there is none)."""
    target = _qualified(schema, table.name)
    if stage is None:
        cur.execute(sql.SQL("DELETE FROM {}").format(target))
    else:
        match = sql.SQL(" AND ").join(sql.SQL("s.{c} = t.{c}").format(c=sql.Identifier(c)) for c in table.key)
        cur.execute(sql.SQL("DELETE FROM {} AS t WHERE NOT EXISTS (SELECT 1 FROM {} AS s WHERE {})").format(
            target, stage, match))
    return max(cur.rowcount, 0)


def _apply_deletes(cur, schema: str, table: MirrorTable, deletes) -> int:
    """Delete the target rows whose key is in ``deletes``; returns how many were deleted."""
    deletes = _to_arrow(deletes, table.key, "deletes")
    if deletes.num_rows == 0:
        return 0
    stage = sql.Identifier(f"_mirror_delete_{table.name}"[:MAX_IDENTIFIER])
    cur.execute(sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
        stage, _idents(table.key), _qualified(schema, table.name)))
    _copy_rows(cur, stage, table, table.key, deletes, "deletes")
    match = sql.SQL(" AND ").join(sql.SQL("t.{c} = d.{c}").format(c=sql.Identifier(c)) for c in table.key)
    cur.execute(sql.SQL("DELETE FROM {} AS t USING {} AS d WHERE {}").format(
        _qualified(schema, table.name), stage, match))
    return max(cur.rowcount, 0)


class LedgerForgotten(RuntimeError):
    """The ledger no longer holds the version a batch of changes was read after: Postgres forgot the
    table meanwhile (dropped, emptied or written outside the mirror). Nothing was written; the batch
    must be made again, as the whole source."""


def upsert_batch(conn, schema: str, table: MirrorTable, rows, source: str, version: int,
                 deletes=None, source_id: str | None = None, replace: bool = False, whole: bool = False,
                 since: int | None = None) -> int:
    """Apply one batch to ``schema.table`` exactly once; returns the number of rows inserted or changed.

    ``rows``: pandas DataFrame or pyarrow Table with (at least) the table's columns. ``source`` names
    where the rows come from (e.g. the Delta table path or stream name) and ``version`` their Delta
    version or micro-batch id; a ``(source, table)`` pair whose ledger version is already ``>= version``
    is skipped (returns 0). ``deletes``: optional frame with the key columns of rows to delete (applied
    after the upsert). Rows whose stored values already equal the new ones are not rewritten and not
    counted. Everything, ledger included, commits in one transaction or not at all. The connection
    must not be inside a transaction; ``ensure_schema`` must have created the table and ledger.

    ``source_id``: the identity of the source (a Delta table's id), kept in the ledger. When the
    ledger holds another one, the source was deleted and created again (``lakehouse stream --reset``,
    a restored table) and its versions count anew: ``rows`` must then be the whole new source, which
    replaces the table's rows (deleted first, in the same transaction), whatever the versions say.
    ``replace``: ``rows`` are the whole source at ``version`` and replace the table's rows the same
    way, unless the ledger has applied ``version`` already (the changes since the ledger's version can
    no longer be read, say). ``whole``: ``rows`` are the whole source at ``version``; they are upserted
    as usual (rows already equal are not rewritten) and the table's rows whose key is not among them
    are deleted, in the same transaction (a table the ledger forgot: written by hand, or holding rows
    published ahead of versions not committed yet). ``since``: ``rows`` are the changes after that
    version, which the ledger held when they were read; should it hold no entry now (Postgres forgot
    the table meanwhile), :class:`LedgerForgotten` is raised and nothing is written.

    The batch holds an exclusive advisory lock on the table until it commits; a write outside the
    mirror takes it shared (:data:`FOREIGN_LOCK`), so the two never interleave.
    """
    version = int(version)
    with _transaction(conn) as cur:
        _as_writer(cur)
        _advisory_lock(cur, "batch", schema, source, table.name)
        _advisory_lock(cur, "table", schema, table.name)
        entry = _read_entry(cur, schema, source, table.name)
        replaced = recreated(entry, source_id)
        if entry is not None and entry[0] >= version and not replaced:
            log.info("%s.%s: %s version %d already applied (ledger at %d); skipped", schema, table.name,
                     source, version, entry[0])
            return 0
        if since is not None and entry is None:
            raise LedgerForgotten(f"{schema}.{table.name}: the ledger forgot {source} (it held version {since} "
                                  "when the changes after it were read)")
        t0 = time.monotonic()
        cleared = 0
        if replaced or replace:
            cur.execute(sql.SQL("DELETE FROM {}").format(_qualified(schema, table.name)))
            cleared = max(cur.rowcount, 0)
        if replaced:
            log.warning("%s.%s: %s was created again (id %s, was %s): its rows replace the table's",
                        schema, table.name, source, source_id, entry[1])
        upserted = _load_empty(cur, schema, table, rows)
        if upserted is None:
            stage = _stage_rows(cur, schema, table, rows)
            upserted = _merge(cur, schema, table, stage) if stage is not None else 0
            if whole:
                cleared += _delete_absent(cur, schema, table, stage)
        deleted = _apply_deletes(cur, schema, table, deletes) if deletes is not None else 0
        _record_version(cur, schema, source, table.name, version, upserted, source_id)
    log.info("%s.%s: applied %s version %d (%d rows upserted, %d deleted%s) in %.2f s", schema, table.name,
             source, version, upserted, deleted, f", {cleared} old rows removed" if cleared else "",
             time.monotonic() - t0)
    return upserted


def publish_ahead(conn, schema: str, table: MirrorTable, rows, source: str, before: int | None,
                  source_id: str | None = None) -> int | None:
    """Upsert ``rows`` that a writer is about to commit to ``source`` as a version after ``before``
    (its latest version when the rows were computed), ahead of the mirror: a stream serves its new
    rows from Postgres without waiting for its Delta commit and the next mirror round.

    The ledger is left alone: the mirror applies that commit later as always (the same values: no
    row is rewritten), and it stays the only way a version counts as applied. Under the same advisory
    lock as :func:`upsert_batch`, the rows are skipped (returns None) once the ledger has passed
    ``before``: the mirror has applied newer versions, which the rows must not overwrite. Rows published
    and then never committed (the writer died first) are rewritten by the replay's commit, which the
    mirror applies too. Skipped as well while the ledger holds another ``source_id`` (the source was
    created again: the mirror first replaces the table). Returns the rows inserted or changed.
    """
    with _transaction(conn) as cur:
        _as_writer(cur)
        _advisory_lock(cur, "batch", schema, source, table.name)
        entry = _read_entry(cur, schema, source, table.name)
        if entry is not None and (before is None or entry[0] > before or recreated(entry, source_id)):
            return None
        stage = _stage_rows(cur, schema, table, rows)
        return _merge(cur, schema, table, stage) if stage is not None else 0


# ---- provisional rows (the express lane) ------------------------------------------------------
#: Rows the express lane (:mod:`lakehouse.express`) inserted ahead of gold, with the inbox file they
#: came from, until the stream has processed that file: then each row is either gold's own (the mirror
#: rewrites it with gold's values) or an orphan that gold will never write, and is deleted.
JOURNAL_TABLE = "_express_journal"


def ensure_journal(conn, schema: str) -> None:
    """Create the express lane's journal (``schema._express_journal``) unless it exists. Commits."""
    with _transaction(conn) as cur:
        _advisory_lock(cur, "schema", schema)
        cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        cur.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (event_id text PRIMARY KEY, source_file text NOT NULL, "
            "published_at timestamptz NOT NULL DEFAULT now())").format(_qualified(schema, JOURNAL_TABLE)))
        cur.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (source_file)").format(
            sql.Identifier(f"{JOURNAL_TABLE}_source_file"), _qualified(schema, JOURNAL_TABLE)))


def publish_provisional(conn, schema: str, table: MirrorTable, rows, source_file: str) -> list[str]:
    """Insert the ``rows`` of ``table`` (keyed by ``event_id``) whose key is not in the table yet, and
    journal them with ``source_file``, in one transaction; returns the keys inserted.

    A row already there (gold's, published or mirrored) is left as it is: a provisional row never
    overwrites anything, and gold's rows overwrite it (:func:`publish_ahead`, :func:`upsert_batch`).
    The rows are inserted in key order, as the upserts do, so two writers never deadlock."""
    if table.key != ("event_id",):
        raise ValueError(f"{table.name}: provisional rows are journaled by event_id, not {table.key}")
    with _transaction(conn) as cur:
        _as_writer(cur)
        stage = _stage_rows(cur, schema, table, rows)
        if stage is None:
            return []
        cols = _idents(table.column_names)
        cur.execute(sql.SQL("INSERT INTO {target} ({cols}) SELECT DISTINCT ON (event_id) {cols} FROM {stage} "
                            "ORDER BY event_id, {ord} DESC ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
                            ).format(target=_qualified(schema, table.name), cols=cols, stage=stage,
                                     ord=sql.Identifier(ORD_COLUMN)))
        inserted = [r[0] for r in cur.fetchall()]
        if inserted:
            cur.execute(sql.SQL("INSERT INTO {} (event_id, source_file) SELECT unnest(%s::text[]), %s "
                                "ON CONFLICT (event_id) DO UPDATE SET source_file = EXCLUDED.source_file, "
                                "published_at = now()").format(_qualified(schema, JOURNAL_TABLE)),
                        (inserted, source_file))
    return inserted


def journaled(conn, schema: str, files: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """The journal's (event_id, source_file) entries: those of ``files``, or all of them (None)."""
    with _transaction(conn) as cur:
        query = sql.SQL("SELECT event_id, source_file FROM {}").format(_qualified(schema, JOURNAL_TABLE))
        if files is None:
            cur.execute(query)
        else:
            cur.execute(query + sql.SQL(" WHERE source_file = ANY(%s)"), (sorted(files),))
        return [(r[0], r[1]) for r in cur.fetchall()]


def resolve_provisional(conn, schema: str, table: MirrorTable, entries: Iterable[str],
                        orphans: Iterable[str]) -> int:
    """Close the journal ``entries`` (event ids) whose files the stream has processed: delete the rows
    of ``orphans`` among them (events gold will never hold: quarantined, or a duplicate gold keeps
    under another delivery) and the entries, in one transaction; returns the rows deleted. A row is
    deleted only while its entry is still journaled: the journal holds only rows this lane inserted
    into an empty key, which nothing but gold may overwrite, and gold never holds an orphan."""
    entries, orphans = sorted(set(entries)), sorted(set(orphans))
    with _transaction(conn) as cur:
        _as_writer(cur)
        deleted = 0
        if orphans:
            cur.execute(sql.SQL("DELETE FROM {t} AS t USING {j} AS j WHERE j.event_id = t.event_id "
                                "AND j.event_id = ANY(%s)").format(
                t=_qualified(schema, table.name), j=_qualified(schema, JOURNAL_TABLE)), (orphans,))
            deleted = max(cur.rowcount, 0)
        if entries:
            cur.execute(sql.SQL("DELETE FROM {} WHERE event_id = ANY(%s)").format(
                _qualified(schema, JOURNAL_TABLE)), (entries,))
    return deleted


# ---- retries ----------------------------------------------------------------------------------
#: Errors that mean "Postgres is (temporarily) unreachable or aborted us": worth a retry with a new
#: connection. OperationalError covers lost connections, admin shutdown, serialization failures and
#: deadlocks; InterfaceError a connection that was already closed under us.
RETRYABLE = (psycopg2.OperationalError, psycopg2.InterfaceError, postgres.PostgresUnavailable)


def with_retries(fn: Callable[[Any], T], settings, attempts: int | None = 8, backoff: float = 0.5,
                 max_backoff: float = 30, on_retry: Callable[[int, BaseException, float], None] | None = None,
                 deadline: float | None = None) -> T:
    """``fn(conn)`` with a fresh connection (``postgres.connect(settings)``), retried while Postgres is away.

    On a retryable error (connection refused or lost, server shut down, serialization failure,
    deadlock: see :data:`RETRYABLE`) the connection is closed, ``on_retry(attempt, exc, delay)`` is
    called (``attempt`` = the 1-based attempt that failed), and the call is retried after ``delay`` =
    ``backoff * 2**(attempt-1)`` capped at ``max_backoff`` seconds. The last error is re-raised after
    ``attempts`` attempts (``None``: no limit), or when ``deadline`` seconds (measured from this call;
    ``None``: none) would pass before the next attempt. With ``attempts=None`` and ``deadline=None`` it
    retries forever. Other errors propagate at once. ``fn`` must be safe to run again (e.g.
    :func:`upsert_batch`, whose ledger makes a retried batch a no-op if an earlier try committed).
    """
    if attempts is not None and attempts < 1:
        raise ValueError("attempts must be >= 1 (or None for no limit)")
    end = None if deadline is None else time.monotonic() + deadline
    attempt = 0
    while True:
        attempt += 1
        conn = None
        try:
            conn = postgres.connect(settings)
            return fn(conn)
        except RETRYABLE as exc:
            delay = min(max_backoff, backoff * (2 ** (attempt - 1)))
            if attempts is not None and attempt >= attempts:
                raise
            if end is not None and time.monotonic() + delay > end:
                raise
            log.warning("Postgres call failed (attempt %d%s): %s; retrying in %.2f s", attempt,
                        f"/{attempts}" if attempts else "", str(exc).strip().splitlines()[0] if str(exc).strip()
                        else type(exc).__name__, delay)
            if on_retry is not None:
                on_retry(attempt, exc, delay)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        time.sleep(delay)

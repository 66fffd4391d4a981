"""The ``lakehouse`` command. Thin: parse arguments, build Settings, call the library.

Every sub-command has ``--help``. Errors the user can fix (no Java, Postgres unreachable, a corrupt
checkpoint, a bad setting) end the command with one clear message and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import Future
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from lakehouse.config import QUERIES, TABLES, Settings
from lakehouse.laps import wall_seconds

# Off a terminal (a log file, Airflow's task log, a pipe or $(...)), rich wraps at 80 columns and would
# cut a path or a DSN in two: there, each message stays one line.
console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())
out = Console(soft_wrap=not sys.stdout.isatty())


class UserError(RuntimeError):
    """An error with a message that tells the user what to do."""


class DiskFull(RuntimeError):
    """A write failed because a file system is full (of the data folder, Spark's scratch or Postgres')."""


def disk_full(exc: BaseException, settings: Settings) -> DiskFull | None:
    """``exc`` told as one line when a full file system caused it (however deep in a Java trace), with
    the free space of the folders the jobs write; else None."""
    import errno

    from lakehouse import damage
    from lakehouse.spark import scratch_root

    text = damage.full_text(exc)
    if not (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) \
            and not any(words in text for words in damage.DISK_FULL):
        return None
    free = []
    for what, folder in (("data folder", settings.data_root), ("Spark's scratch", scratch_root())):
        try:
            free.append(f"{what} {folder}: {shutil.disk_usage(folder).free / 1e9:.1f} GB free")
        except OSError:
            continue
    return DiskFull(f"a file system is full (No space left on device); {'; '.join(free) or 'free space unknown'}. "
                    "Free space (`lakehouse maintain` compacts and vacuums the Delta tables) and run the command "
                    "again: the stream resumes from its checkpoint and replays a micro-batch cut short; the "
                    "other jobs can simply be run again.")


def check_data_root(settings: Settings) -> None:
    """Raise :class:`UserError` unless the data folder exists (or can be made) and takes a file: said
    before Spark starts, rather than as an OS error's trace from whichever write comes first."""
    import errno
    import tempfile

    root = settings.data_root
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        why = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        if isinstance(exc, FileExistsError) or (root.exists() and not root.is_dir()):
            why = "it is a file, not a folder"
        elif isinstance(exc, NotADirectoryError):
            why = "a file is in the place of one of its parent folders"
        raise UserError(f"cannot write the data folder {root} (LAKEHOUSE_DATA): {why}; set LAKEHOUSE_DATA to a "
                        "folder you may write (it is created if missing), or give your user this one.") from None


#: Commands that never write under the data folder (:func:`check_data_root` is skipped for them, and
#: for `pg` but `pg start`); every other does, if only as a Spark start's warehouse and Derby folders.
_READS_ONLY = {"info", "ui"}


def open_files_exhausted(exc: BaseException) -> UserError | None:
    """``exc`` told as one line when the process ran out of file descriptors (Spark opens many: a
    table's files, its log, the shuffle's); else None."""
    import errno
    import resource

    from lakehouse import damage

    if not (isinstance(exc, OSError) and exc.errno == errno.EMFILE) \
            and damage.OPEN_FILES not in damage.full_text(exc):
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    more = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    return UserError(f"the job reached the limit of files a process may hold open ({soft}; `ulimit -n` shows it). "
                     f"Raise it in the shell that runs the job (e.g. `ulimit -n {more}`) and run the command "
                     "again: nothing is damaged, and the stream resumes from its checkpoint.")


# ---- generate -------------------------------------------------------------------------------------

def _parse_start(text: str | None):
    if not text:
        return None
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"{text!r} is not a date or time; use ISO 8601, e.g. 2026-11-30 or 2026-11-30T12:00:00Z") from None
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


def cmd_generate(args, settings: Settings) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lakehouse.generator import GeneratorConfig, generate_backlog, run_live

    knobs = dict(seed=args.seed, n_users=args.users, n_merchants=args.merchants, days=args.days,
                 start=_parse_start(args.start), n_events=args.events,
                 duplicate_rate=args.duplicate_rate, late_rate=args.late_rate,
                 malformed_rate=args.malformed_rate)
    if args.file_events:
        knobs["file_events"] = args.file_events
    try:
        config = GeneratorConfig(**{k: v for k, v in knobs.items() if v is not None})
    except ValueError as exc:  # a rate outside [0, 1], a start it cannot read ...
        raise UserError(f"{exc}; see `lakehouse generate --help`") from None
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("generate", total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        if args.live:
            summary = run_live(settings.events_inbox, settings.labels_inbox, config,
                               rate=args.rate, duration_s=args.duration, progress=report)
        else:
            summary = generate_backlog(settings.events_inbox, settings.labels_inbox, config, progress=report)
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=2, default=str))
    out.print_json(json.dumps(summary, default=str))
    return 0


# ---- stream ---------------------------------------------------------------------------------------

def reset_stream(settings: Settings) -> list[str]:
    """Remove the stream checkpoints and every table built from the inboxes (the inboxes stay)."""
    removed = []
    for query in QUERIES:
        path = settings.checkpoint(query)
        if path.exists():
            shutil.rmtree(path)
            removed.append(str(path))
    for name, (layer, _) in TABLES.items():
        path = settings.table_path(name)
        if layer in ("bronze", "silver", "gold") and path.exists():
            shutil.rmtree(path)
            removed.append(str(path))
    return removed


def cmd_stream(args, settings: Settings) -> int:
    from lakehouse import streaming

    kinds = tuple(args.only) if args.only else QUERIES
    # Before the reset and Spark's start: a second stream is refused at once, and a reset never
    # removes what a running stream writes to.
    with streaming.stream_lock(settings, QUERIES if args.reset else kinds):
        return _stream(args, settings, kinds)


def _stream(args, settings: Settings, kinds: tuple[str, ...]) -> int:
    from lakehouse import quality, streaming, summary
    from lakehouse.spark import build_spark

    if args.reset:
        for path in reset_stream(settings):
            console.print(f"[yellow]removed[/] {path}")
    if args.trigger_seconds:
        settings = settings.replace(trigger_seconds=args.trigger_seconds)
    if args.max_files:
        settings = settings.replace(max_files_per_trigger=args.max_files)
    serving = _start_serving(settings) if args.mirror else None
    console.print(f"[bold]starting Spark[/] ({settings.spark_master}) ...")
    quality.preload()  # the checks' import runs while the JVM starts
    spark = build_spark(settings, app_name="lakehouse-stream")
    if serving is not None:
        _serving_started(serving)
    started = time.time()
    totals = {"records_in": 0, "inserted": 0}

    def on_batch(r) -> None:
        totals["records_in"] += r.records_in
        totals["inserted"] += r.inserted
        rate = totals["records_in"] / max(time.time() - started, 1e-9)
        mark = "[green]ok[/]" if r.reconciled else "[red]NOT RECONCILED[/]"
        console.print(
            f"{r.kind:>6} batch {r.batch_id:>4}: in {r.records_in:>8,}  inserted {r.inserted:>8,}  "
            f"duplicates {r.duplicates:>6,}  quarantined {r.quarantined:>6,}  {mark}  ({rate:,.0f} rec/s)"
        )

    stop = threading.Event()
    if not args.once:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        console.print(f"streaming {', '.join(kinds)} every {settings.trigger_seconds}s; Ctrl-C stops")
    loop = publisher = express = None
    if args.mirror:
        from lakehouse import mirror

        say = lambda msg: console.print(f"[yellow]{msg}[/]")  # noqa: E731
        loop = mirror.MirrorLoop(spark, settings, report=say)
        if not args.once:  # live: new gold rows go to Postgres as soon as computed, the mirror follows
            publisher = mirror.Publisher(settings, report=say)
            publisher.start()
            loop.start()
            if settings.express and settings.stream_gold:  # provisional features ahead of each batch
                from lakehouse.express import ExpressLane

                express = ExpressLane(settings, report=say)
    streaming.run_streams(spark, settings, once=args.once, kinds=kinds, on_batch=on_batch, stop_event=stop,
                          publish=publisher.submit if publisher is not None else None, express=express)
    if publisher is not None:
        publisher.stop()
    if express is not None:
        st = express.stats
        console.print(f"express lane: {st['rows_published']:,} provisional rows served from {st['files']:,} files "
                      f"({st['events_left_out']:,} events and {st['lines_left_out']:,} lines left to the stream); "
                      f"{st['entries_resolved']:,} resolved, {st['orphans_deleted']:,} orphans deleted; "
                      f"{st['rounds']:,} rounds, {st['compute_seconds'] / max(1, st['rounds']):.2f} s computing "
                      f"and {st['insert_seconds'] / max(1, st['rounds']):.2f} s inserting on average")
    if loop is not None:
        console.print("mirroring the last changes into Postgres ...")
        if loop.is_alive():
            loop.stop()
        else:  # a catch-up: the stream has stopped, so two tables at once, as `lakehouse mirror`
            loop.run_round(workers=2)
        _resolve_express_journal(spark, settings)
    rec = summary.reconciliation(spark, settings)
    out.print_json(json.dumps({"reconciliation": rec, "seconds": round(time.time() - started, 1)}))
    if any(not v["reconciled"] for v in rec.values()):
        console.print("[red]reconciliation failed: see silver_dq_batches[/]")
        return 1
    return 0


def _start_serving(settings: Settings) -> Future:
    """``stream --mirror`` serves from the project's Postgres: on embedded defaults the server is
    started here, while Spark starts, as ``lakehouse mirror`` starts it (``pg_ctl`` gives it a session
    of its own: it outlives this job, even a kill -9 of it; ``lakehouse pg stop`` ends it)."""
    from concurrent.futures import ThreadPoolExecutor

    from lakehouse.io import postgres

    pool = ThreadPoolExecutor(1, thread_name_prefix="lakehouse-pg-start")
    try:
        return pool.submit(postgres.ensure_running, settings)
    finally:
        pool.shutdown(wait=False)


def _serving_started(serving: Future) -> None:
    """Wait for :func:`_start_serving`. A server that cannot be reached (``LAKEHOUSE_PG_DSN`` down) is
    said once and left to the mirror, which retries with back-off: the stream into Delta goes on."""
    from lakehouse.io import postgres

    try:
        serving.result()
    except postgres.PostgresUnavailable as exc:
        console.print(f"[yellow]{exc}; the stream goes on, and the mirror retries with back-off[/]")


# ---- backfill / mirror ----------------------------------------------------------------------------

def _positive(kind: type):
    """An argparse type: a number of ``kind`` above zero (a count, a duration, a rate)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _date_range(date_from, date_to):
    """``(date_from, date_to)`` of an inclusive ``--from`` / ``--to`` range; refused when reversed."""
    if date_to < date_from:
        raise UserError(f"--to {date_to} is before --from {date_from}")
    return date_from, date_to


def _date(text: str):
    from datetime import date

    try:
        return date.fromisoformat(text)
    except ValueError:
        raise UserError(f"{text!r} is not a date; use YYYY-MM-DD") from None


def cmd_backfill(args, settings: Settings) -> int:
    from lakehouse import gold
    from lakehouse.spark import build_spark

    date_from, date_to = _date_range(_date(args.date_from), _date(args.date_to))
    console.print(f"[bold]backfill[/] gold for {date_from} .. {date_to} from silver ...")
    spark = build_spark(settings, app_name="lakehouse-backfill")
    t0 = time.time()
    try:
        written = gold.backfill(spark, settings, date_from, date_to)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    for name, rows in written.items():
        console.print(f"  {name:<28} {rows:>10,} rows")
    result = {"from": str(date_from), "to": str(date_to), "rows": written, "seconds": round(time.time() - t0, 1)}
    if args.mirror:
        from lakehouse import mirror
        from lakehouse.io import postgres

        postgres.ensure_running(settings)
        result["mirror"] = mirror.mirror_all(spark, settings, on_retry=_say_retry)
    out.print_json(json.dumps(result, default=str))
    return 0


def _say_retry(attempt, exc, delay) -> None:
    console.print(f"[yellow]Postgres unavailable (attempt {attempt}): retrying in {delay:.1f}s[/] ({exc})")


def _resolve_express_journal(spark, settings: Settings) -> None:
    """Provisional rows an express lane left (a killed live job) are resolved against silver."""
    from lakehouse.express import resolve_journal

    try:
        deleted = resolve_journal(spark, settings)
    except Exception as exc:  # noqa: BLE001 -- the next mirror or live start resolves it
        console.print(f"[yellow]express journal not resolved ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}); "
                      "the next `lakehouse mirror` or live stream resolves it[/]")
        return
    if deleted:
        console.print(f"express journal: {deleted} provisional rows of events gold does not hold deleted")


def cmd_mirror(args, settings: Settings) -> int:
    from lakehouse import mirror
    from lakehouse.io import postgres
    from lakehouse.spark import build_spark

    postgres.ensure_running(settings)
    spark = build_spark(settings, app_name="lakehouse-mirror")
    results = mirror.mirror_all(spark, settings, on_retry=_say_retry)
    _resolve_express_journal(spark, settings)
    for r in results:
        console.print(f"  {r['table']:<28} -> Postgres {settings.pg_schema}.{r['table']}: {r}")
    out.print_json(json.dumps(results, default=str))
    return 0


# ---- pg -------------------------------------------------------------------------------------------

def cmd_pg(args, settings: Settings) -> int:
    from lakehouse.io import postgres

    if args.action == "start":
        dsn = postgres.start(settings)
        console.print("[green]Postgres is running[/]")
        out.print(dsn)
    elif args.action == "stop":
        was = postgres.stop(settings)
        console.print("stopped" if was else "was not running")
    elif args.action == "status":
        out.print_json(json.dumps(postgres.status(settings), default=str))
    elif args.action == "url":
        out.print(postgres.resolve_dsn(settings))
    return 0


# ---- info -----------------------------------------------------------------------------------------

def cmd_info(args, settings: Settings) -> int:
    info = settings.as_dict()
    try:
        from lakehouse.io import postgres

        info["pg_dsn_resolved"] = postgres.resolve_dsn(settings)
        info["pg_mode"] = "external" if settings.pg_dsn else "embedded"
    except Exception as exc:  # info must work even when Postgres is not set up
        info["pg_dsn_resolved"] = None
        info["pg_error"] = str(exc)
    if args.json:
        out.print(json.dumps(info, indent=2, default=str), soft_wrap=True, highlight=False)
        return 0
    out.print(f"[bold]data root[/]   {info['data_root']}")
    out.print(f"[bold]inboxes[/]     {info['events_inbox']}  |  {info['labels_inbox']}")
    out.print(f"[bold]postgres[/]    {info['pg_dsn_resolved']} ({info['pg_mode'] if 'pg_mode' in info else '?'})")
    out.print(f"[bold]mlflow[/]      {info['mlflow_tracking_uri']}")
    out.print("[bold]tables[/]")
    for name, path in info["tables"].items():
        out.print(f"  {name:<22} {path}")
    out.print("[bold]checkpoints[/]")
    for name, path in info["checkpoints"].items():
        out.print(f"  {name:<22} {path}")
    return 0


# ---- demo -----------------------------------------------------------------------------------------

def cmd_demo(args, settings: Settings) -> int:
    """The whole story on embedded defaults: generate simulated days with fraud and stream defects,
    stream them (silver and gold in each micro-batch), train and promote a model, score, mirror into
    Postgres, build the dbt marts, and print a summary."""
    from lakehouse import streaming

    with streaming.stream_lock(settings, QUERIES):  # refused before it starts, beside a running stream
        return _demo(args, settings)


def _demo(args, settings: Settings) -> int:
    from datetime import datetime as _dt, timedelta

    from lakehouse import marts, mirror, quality, streaming, summary
    from lakehouse.generator import GeneratorConfig, generate_backlog
    from lakehouse.io import postgres
    from lakehouse.ml import dataset, evaluate, scorer, train
    from lakehouse.spark import build_spark

    steps, started = 8, time.time()
    say = lambda text: console.print(f"      {text}", highlight=False)  # noqa: E731
    console.rule("[bold]lakehouse demo")
    console.print(f"[1/{steps}] Postgres ({'external' if settings.pg_dsn else 'embedded'}) ...")
    dsn = postgres.start(settings)
    say(dsn)
    console.print(f"[2/{steps}] generating {args.days:g} simulated days, {args.users:,} card holders (seed {args.seed}) ...")
    t0 = time.time()
    gen = generate_backlog(settings.events_inbox, settings.labels_inbox,
                           GeneratorConfig(seed=args.seed, days=args.days, n_users=args.users))
    say(f"{gen['lines_written']:,} event lines in {gen['files']} files, {gen['labels_written']:,} labels "
        f"({time.time() - t0:.1f}s)")
    console.print(f"[3/{steps}] streaming the inboxes: bronze, silver, gold per micro-batch (availableNow) ...")
    quality.preload()
    spark = build_spark(settings, app_name="lakehouse-demo")
    t0 = time.time()

    def on_batch(r) -> None:
        say(f"{r.kind} batch {r.batch_id}: {r.records_in:,} in, {r.inserted:,} new, {r.duplicates:,} dup, "
            f"{r.quarantined:,} quarantined ({wall_seconds(r.seconds):.1f}s)")

    streaming.run_streams(spark, settings, once=True, on_batch=on_batch)
    say(f"done in {time.time() - t0:.1f}s")
    first = _dt.fromisoformat(gen["start"].replace("Z", "+00:00")).date()
    last = (_dt.fromisoformat(gen["end"].replace("Z", "+00:00")) - timedelta(microseconds=1)).date()

    # A split that fits the simulated span: the test window and a gap for label delay at the end.
    test_days, gap_days, maturity_days = 3, 2, 2
    train_days = max(2, int(args.days) - test_days - gap_days - maturity_days - 1)
    console.print(f"[4/{steps}] training: {train_days} days train, {gap_days} gap, {test_days} test "
                  f"(MLflow {settings.mlflow_tracking_uri}) ...")
    model = None
    try:
        cfg = train.TrainConfig(split=dataset.SplitConfig(train_days=train_days, gap_days=gap_days,
                                                          test_days=test_days, maturity_days=maturity_days))
        model = train.train(spark, settings, cfg, progress=say).summary()
        say(f"{model['model']}: {evaluate.ranking_summary(model, 3)}"
            f"  P@100/day {model.get('precision_at_100_per_day', float('nan')):.3f}  threshold {model['threshold']:.4f}  "
            f"{'promoted to champion' if model['promoted'] else 'not promoted'} ({model['reason']})")
    except dataset.DatasetError as exc:
        console.print(f"[yellow]      no model: {exc}[/] (generate more days: --days 21)")
    console.print(f"[5/{steps}] scoring {first} .. {last} with the champion -> gold risk_scores ...")
    scored = scorer.score_range(spark, settings, first, last)
    say(f"{scored['scored']:,} scored, {scored.get('alerts', 0):,} alerts ({scored['model'] or scored.get('reason')})")
    console.print(f"[6/{steps}] mirroring into Postgres schema {settings.pg_schema} ...")
    mirrored = mirror.mirror_all(spark, settings, on_retry=_say_retry)
    say(", ".join(f"{r['table']} {r.get('rows', 0):,}" for r in mirrored if "skipped" not in r))
    console.print(f"[7/{steps}] dbt build (schema marts) and the risk summary")
    dbt_ok = marts.build_and_summarize(settings, lambda line: console.print(f"      {line}", highlight=False,
                                                                            markup=False))
    console.print(f"[8/{steps}] summary")
    result = {
        "tables": summary.table_counts(spark, settings),
        "postgres": {r["table"]: {"version": r.get("version"), "rows_written": r.get("rows")} for r in mirrored},
        "reconciliation": summary.reconciliation(spark, settings),
        "quarantine_by_check": summary.quarantine_by_check(spark, settings),
        "generator": {k: gen[k] for k in ("events", "duplicates", "malformed", "late", "fraud_events",
                                          "labels_written") if k in gen},
        "model": model and {k: model.get(k) for k in ("model", "promoted", "roc_auc", "average_precision",
                                                      "precision_at_100_per_day", "threshold", "run_id")},
        "scored": scored,
        "seconds": round(time.time() - started, 1),
    }
    out.print_json(json.dumps(result, default=str))
    ok = all(v["reconciled"] for v in result["reconciliation"].values())
    console.print("[green]every batch reconciled[/]" if ok else "[red]reconciliation failed[/]")
    console.print("next:\n"
                  "  lakehouse ui                       MLflow runs, the threshold report, the model registry\n"
                  "  lakehouse dbt docs generate && lakehouse dbt docs serve   the marts, described\n"
                  f"  psql \"{dsn}\" -c 'select * from {settings.pg_schema}.risk_alerts limit 20'   the alerts view\n"
                  "  lakehouse dashboard --serve        the risk dashboard;  lakehouse pg stop  stops Postgres",
                  highlight=False)
    return 0 if ok and dbt_ok else 1


# ---- maintain / dq-summary / dashboard (orchestration) -------------------------------------------

def cmd_maintain(args, settings: Settings) -> int:
    from lakehouse import maintenance
    from lakehouse.spark import build_spark

    spark = build_spark(settings, app_name="lakehouse-maintain")
    pins = maintenance.collect_pins(settings)
    for name, held in sorted(pins.items()):
        console.print(f"  pinned {name:<28} " + ", ".join(f"v{v} ({who})" for who, v in held))
    what = "plan (dry run)" if args.dry_run else "OPTIMIZE + VACUUM"
    console.print(f"[bold]maintain[/] {what} of the Delta tables under {settings.delta_root} ...")

    def say(r) -> None:
        pin = f"keeps v{r.pinned_version} ({', '.join(r.pinned_by)})" if r.pinned_version is not None else "no pin"
        compacted = (f"compaction skipped ({r.compaction_skipped})" if r.compaction_skipped else
                     f"compacted {r.compacted_files_removed:>4} -> {r.compacted_files_added:<3} files")
        console.print(f"  {r.table:<28} {compacted} [{r.compaction_scope}]  "
                      + (f"vacuum skipped ({r.vacuum_skipped})  " if r.vacuum_skipped else
                         f"vacuum removed {r.vacuum_files_deleted:>4} files  ")
                      + f"retention {r.retention_hours:.0f} h ({pin})"
                      + (f"  log retention -> {r.log_retention_set}" if r.log_retention_set else ""))
        for warning in r.warnings:
            console.print(f"  [yellow]{r.table}: {warning}[/]")

    try:
        reports = maintenance.maintain(spark, settings, tables=args.table, pins=pins, dry_run=args.dry_run,
                                       on_table=say)
    except KeyError as exc:
        raise UserError(exc.args[0]) from None
    if not reports:
        console.print("  no Delta tables yet: nothing to do")
    out.print(json.dumps([r.as_dict() for r in reports], default=str), soft_wrap=True, highlight=False)
    return 0


def cmd_dq_summary(args, settings: Settings) -> int:
    from lakehouse import dq_summary
    from lakehouse.spark import build_spark

    if args.date and (args.date_from or args.date_to):
        raise UserError("give --date, or --from/--to, not both")
    today = datetime.now(timezone.utc).date()
    date_from = _date(args.date or args.date_from) if (args.date or args.date_from) else today
    date_to = _date(args.date or args.date_to) if (args.date or args.date_to) else max(date_from, today)
    date_from, date_to = _date_range(date_from, date_to)
    spark = build_spark(settings, app_name="lakehouse-dq-summary")
    summary = dq_summary.summarize(spark, settings, date_from, date_to)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2, default=str))
    if args.json:
        out.print(json.dumps(summary, default=str), soft_wrap=True, highlight=False)
    else:
        for line in dq_summary.render_text(summary):
            out.print(line, soft_wrap=True, highlight=False)
    return 0 if summary["all_reconciled"] or not args.strict else 1


def cmd_dashboard(args, settings: Settings) -> int:
    from lakehouse import dashboard
    from lakehouse.io import postgres

    target = Path(args.out) if args.out else settings.data_root / "reports" / "dashboard.html"
    postgres.ensure_running(settings)  # the embedded server is started, as for `lakehouse dbt`
    console.print(f"[bold]dashboard[/] from Postgres schema {args.schema} ...")
    report = dashboard.write(settings, target, schema=args.schema)
    for panel in report["panels"]:
        state = f"{panel['rows']:>6,} rows" if panel["rows"] else "[yellow]no data yet[/]"
        console.print(f"  {panel['title']:<40} {state}")
    console.print(f"wrote {target}")
    if args.serve:
        dashboard.serve(target, port=args.port, on_ready=lambda url: console.print(f"serving {url} (Ctrl-C stops)"))
    return 0


# ---- train / score / ui (model) ------------------------------------------------------------------

def cmd_train(args, settings: Settings) -> int:
    from lakehouse.ml import dataset, evaluate, registry, threshold, train
    from lakehouse.spark import build_spark

    if sum(x is not None for x in (args.as_of_version, args.as_of_timestamp, args.as_of_run)) > 1:
        raise UserError("give at most one of --as-of-version, --as-of-timestamp, --as-of-run")
    try:
        as_of_version = dataset.parse_as_of_version(args.as_of_version) if args.as_of_version else None
        as_of_ts = _parse_start(args.as_of_timestamp) if args.as_of_timestamp else None
        split = dict(train_days=args.train_days, gap_days=args.gap_days, test_days=args.test_days,
                     maturity_days=args.maturity_days, anchor_date=_date(args.anchor_date) if args.anchor_date else None)
        if args.as_of_run:
            snap = registry.run_snapshot(registry.connect(settings), args.as_of_run)
            as_of_version = (snap["features_version"], snap["labels_version"])
            split.update(train_days=snap["train_days"], gap_days=snap["gap_days"], test_days=snap["test_days"],
                         anchor_date=_date(snap["anchor_date"]))
        cfg = train.TrainConfig(
            split=dataset.SplitConfig(**split),
            policy=threshold.ThresholdPolicy(alert_budget=args.alert_budget, alerts_per_day=args.alerts_per_day,
                                             review_cost=args.review_cost, policy=args.threshold_policy),
            model=args.model, baseline=not args.no_baseline, seed=args.seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    spark = build_spark(settings, app_name="lakehouse-train")
    console.print(f"[bold]train[/] {args.model} model; MLflow store {settings.mlflow_tracking_uri}")
    try:
        result = train.train(spark, settings, cfg, as_of_version=as_of_version, as_of_timestamp=as_of_ts,
                             progress=lambda text: console.print(f"  {text}"))
    except dataset.DatasetError as exc:
        raise UserError(str(exc)) from None
    s = result.summary()
    verdict = "[green]promoted to champion[/]" if result.promoted else "[yellow]not promoted[/]"
    console.print(f"{evaluate.ranking_summary(s)}  "
                  f"P@100/day {s['precision_at_100_per_day']:.3f}  threshold {s['threshold']:.4f}  "
                  f"{s['model']} {verdict} ({result.reason})")
    out.print(json.dumps(s, default=str), soft_wrap=True, highlight=False)
    return 0


def cmd_score(args, settings: Settings) -> int:
    from lakehouse.ml import scorer
    from lakehouse.spark import build_spark

    date_from, date_to = _date_range(_date(args.date_from), _date(args.date_to))
    spark = build_spark(settings, app_name="lakehouse-score")
    console.print(f"[bold]score[/] gold_transaction_features {date_from} .. {date_to} with the champion ...")
    t0 = time.time()
    try:
        result = scorer.score_range(spark, settings, date_from, date_to)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    result["seconds"] = round(time.time() - t0, 1)
    if result["model"] is None:
        console.print(f"[yellow]{result['reason']}[/]: run `lakehouse train` first")
    else:
        console.print(f"  {result['scored']:,} transactions scored with {result['model']}, "
                      f"{result['alerts']:,} alerts ({result['seconds']}s) -> gold risk_scores")
    out.print(json.dumps(result, default=str), soft_wrap=True, highlight=False)
    return 0


def cmd_ui(args, settings: Settings) -> int:
    import subprocess

    from lakehouse.ml import registry

    uri = settings.mlflow_tracking_uri
    db = registry.sqlite_path(uri)
    if db is not None and not db.exists():
        raise UserError(f"no MLflow store at {db} yet: run `lakehouse train` first (or set MLFLOW_TRACKING_URI)")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "ui", "--backend-store-uri", uri,
           "--host", args.host, "--port", str(args.port)]
    artifacts = registry.artifact_location(uri)
    if artifacts:
        cmd += ["--default-artifact-root", artifacts]
    console.print(f"MLflow UI on http://{args.host}:{args.port} (store {uri}); Ctrl-C stops")

    def _stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)  # a TERM stops the server too, not just this wrapper
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        return 0


# ---- dbt (marts) ---------------------------------------------------------------------------------

def cmd_dbt(args, settings: Settings) -> int:
    from lakehouse.io import dbt

    dbt_args = list(args.dbt_args)
    if dbt_args[:1] == ["--"]:
        dbt_args = dbt_args[1:]
    if not dbt_args:
        raise UserError("give dbt's arguments, e.g. `lakehouse dbt build` or `lakehouse dbt docs generate`")
    console.print(f"[bold]dbt {' '.join(dbt_args)}[/] (project {dbt.project_dir()}, Postgres "
                  f"{'external' if settings.pg_dsn else 'embedded'}) ...")
    return dbt.run(settings, dbt_args).returncode


# ---- parser ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lakehouse",
        description="Real-time fraud and risk signal pipeline: inbox JSON -> Delta -> Postgres.",
        epilog="Configuration comes from environment variables (LAKEHOUSE_DATA, LAKEHOUSE_PG_DSN, ...); "
               "`lakehouse info` shows what they resolve to.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="write synthetic payment events and fraud labels to the inboxes",
                       description="Write synthetic card-payment events (with fraud scenarios and stream "
                                   "defects) to the events inbox and delayed fraud labels to the labels inbox.")
    g.add_argument("--seed", type=int, default=42, help="random seed; same seed and --start give identical files")
    g.add_argument("--days", type=_positive(float), default=None, help="simulated days of traffic (backlog mode)")
    g.add_argument("--events", type=_positive(int), default=None, help="target number of events instead of --days volume")
    g.add_argument("--start", default=None, help="simulation start, ISO date/time in UTC (default: today - days)")
    g.add_argument("--users", type=_positive(int), default=None, help="number of simulated card holders")
    g.add_argument("--merchants", type=_positive(int), default=None, help="number of simulated merchants")
    g.add_argument("--duplicate-rate", type=float, default=None, help="share of events re-delivered")
    g.add_argument("--late-rate", type=float, default=None, help="share of events delivered late")
    g.add_argument("--malformed-rate", type=float, default=None, help="share of malformed records")
    g.add_argument("--file-events", type=_positive(int), default=None, help="lines per inbox file")
    g.add_argument("--live", action="store_true", help="replay in real time instead of a backlog")
    g.add_argument("--rate", type=_positive(float), default=100.0, help="live mode: events per second")
    g.add_argument("--duration", type=_positive(float), default=60.0, help="live mode: seconds to run")
    g.add_argument("--summary", default=None, help="also write the JSON summary to this file")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("stream", help="stream the inboxes into Delta bronze, silver and gold",
                       description="Spark Structured Streaming from the inboxes to bronze, silver, "
                                   "quarantine and data-quality tables, and gold (features, windows, risk, "
                                   "too-late events) per micro-batch, exactly once. LAKEHOUSE_STREAM_GOLD=0 "
                                   "leaves gold to `lakehouse backfill`.")
    s.add_argument("--once", action="store_true", help="process what is in the inboxes, then exit (availableNow)")
    s.add_argument("--only", action="append", choices=list(QUERIES), help="run only this stream (repeatable)")
    s.add_argument("--trigger-seconds", type=_positive(float), default=None, help="continuous mode: micro-batch interval")
    s.add_argument("--max-files", type=_positive(int), default=None, help="inbox files per micro-batch at most")
    s.add_argument("--reset", action="store_true",
                   help="delete the checkpoints and the bronze/silver/gold tables first, then rebuild from the inboxes")
    s.add_argument("--mirror", action="store_true",
                   help="also mirror into Postgres (the embedded server is started if it is not running, "
                        "as `lakehouse mirror` does): continuously beside the stream (a Postgres outage does "
                        "not stop it; each events batch's new gold rows are published as soon as they are "
                        "computed, ahead of the mirror), and once more at the end; with --once, only at the "
                        "end. Live, the express lane also serves provisional transaction features of each "
                        "newly landed file within a second or two, replaced by gold's rows as the batches "
                        "follow (LAKEHOUSE_EXPRESS=0 turns it off)")
    s.set_defaults(func=cmd_stream)

    b = sub.add_parser("backfill", help="recompute gold tables for a date range from silver (batch)",
                       description="Recompute the gold rows dated in [--from, --to] (transaction features, "
                                   "five-minute windows, daily merchant and country risk) from silver with the "
                                   "stream's feature functions. Idempotent: the range is replaced atomically. "
                                   "Rows dated after the range keep their values, even those that look back "
                                   "into it (later transactions' trailing windows and risk baselines); so do "
                                   "the windows that start in the last minutes before --from and hold its "
                                   "first events. To carry a change of silver forward, backfill from the day "
                                   "before the first changed day through the last day.")
    b.add_argument("--from", dest="date_from", required=True, help="first event date, YYYY-MM-DD (UTC)")
    b.add_argument("--to", dest="date_to", required=True, help="last event date, YYYY-MM-DD (UTC)")
    b.add_argument("--mirror", action="store_true", help="then mirror the gold tables into Postgres")
    b.set_defaults(func=cmd_backfill)

    m = sub.add_parser("mirror", help="mirror gold tables into Postgres (idempotent, catches up)",
                       description="Apply the gold Delta versions Postgres has not seen yet (change data "
                                   "feed, COPY + upsert, one transaction per table with its ledger row).")
    m.set_defaults(func=cmd_mirror)

    p = sub.add_parser("pg", help="the serving Postgres: start, stop, status, url",
                       description="Manage the embedded Postgres (or check the one named by LAKEHOUSE_PG_DSN).")
    p.add_argument("action", choices=["start", "stop", "status", "url"], help="what to do")
    p.set_defaults(func=cmd_pg)

    i = sub.add_parser("info", help="show resolved paths, tables and the DSN",
                       description="Show the resolved settings: paths, every Delta table location, the DSN.")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="run the main job end to end on embedded defaults",
                       description="Start Postgres, generate simulated days with fraud and stream defects, "
                                   "stream them (silver and gold per micro-batch), train and promote a model "
                                   "(MLflow), score, mirror into Postgres, dbt build, print a summary.")
    d.add_argument("--days", type=_positive(float), default=16.0, help="simulated days to generate (the model needs 10+)")
    d.add_argument("--users", type=_positive(int), default=400, help="simulated card holders")
    d.add_argument("--seed", type=int, default=7, help="random seed")
    d.set_defaults(func=cmd_demo)

    mt = sub.add_parser("maintain", help="compact (OPTIMIZE) and VACUUM the Delta tables, keeping pinned versions",
                        description="OPTIMIZE every Delta table (partitions before today), then VACUUM with a "
                                    "retention of max(168 h, age of the oldest version a registered model or the "
                                    "Postgres mirror still needs), so time travel to those versions keeps working.")
    mt.add_argument("--table", action="append", default=None, help="only this table (repeatable)")
    mt.add_argument("--dry-run", action="store_true", help="show pins, retention and scope; change nothing")
    mt.set_defaults(func=cmd_maintain)

    dq = sub.add_parser("dq-summary", help="data-quality summary of the batches processed in a period",
                        description="Records in, inserted, duplicates, quarantined per expectation, "
                                    "reconciled batches (from silver_dq_batches) and too-late events, for the "
                                    "batches processed on the given UTC dates (default: today).")
    dq.add_argument("--date", default=None, help="one UTC date, YYYY-MM-DD")
    dq.add_argument("--from", dest="date_from", default=None, help="first UTC date, YYYY-MM-DD")
    dq.add_argument("--to", dest="date_to", default=None, help="last UTC date, YYYY-MM-DD (default: today)")
    dq.add_argument("--json", action="store_true", help="print JSON")
    dq.add_argument("--out", default=None, help="also write the JSON summary to this file")
    dq.add_argument("--strict", action="store_true", help="exit 1 when a batch did not reconcile")
    dq.set_defaults(func=cmd_dq_summary)

    db = sub.add_parser("dashboard", help="render the risk dashboard (static HTML) from the dbt marts",
                        description="Build a self-contained HTML risk dashboard (volume and fraud rate over time, "
                                    "risky merchants and countries, velocity alerts, data quality, model "
                                    "performance) from the marts in Postgres; optionally serve it on 127.0.0.1.")
    db.add_argument("--out", default=None, help="HTML file to write (default: <data>/reports/dashboard.html)")
    db.add_argument("--schema", default="marts", help="Postgres schema of the dbt marts")
    db.add_argument("--serve", action="store_true", help="then serve it on http://127.0.0.1:PORT until Ctrl-C")
    db.add_argument("--port", type=_positive(int), default=8050, help="port for --serve")
    db.set_defaults(func=cmd_dashboard)
    tr = sub.add_parser("train", help="train the fraud model on a pinned snapshot, log it to MLflow, gate the champion",
                        description="Build the training set from gold_transaction_features and silver_labels at "
                                    "pinned Delta versions, split by time with a label-delay gap, train the model "
                                    "and a logistic baseline, write the threshold report, log everything to "
                                    "MLflow, register the model and promote it to 'champion' only if it beats "
                                    "the current champion on the same test window.")
    tr.add_argument("--as-of-version", default=None, metavar="F[:L]",
                    help="Delta versions to read: gold_transaction_features F and silver_labels L (default latest)")
    tr.add_argument("--as-of-timestamp", default=None, metavar="TS",
                    help="read both tables as they were at this ISO time (UTC)")
    tr.add_argument("--as-of-run", default=None, metavar="RUN_ID",
                    help="rebuild the training set of an earlier MLflow run (its versions and split)")
    tr.add_argument("--anchor-date", default=None, help="last day of the test window (default: newest day - maturity)")
    tr.add_argument("--train-days", type=int, default=7, help="days in the training window")
    tr.add_argument("--gap-days", type=int, default=7, help="label-delay gap between train and test")
    tr.add_argument("--test-days", type=int, default=7, help="days in the test window")
    tr.add_argument("--maturity-days", type=int, default=7,
                    help="default anchor: this many days before the newest event date (labels mature)")
    tr.add_argument("--alert-budget", type=float, default=0.005, help="share of transactions analysts can review")
    tr.add_argument("--alerts-per-day", type=_positive(int), default=None, help="alert budget as alerts per day instead")
    tr.add_argument("--review-cost", type=float, default=5.0, help="cost of reviewing one alert (USD)")
    tr.add_argument("--threshold-policy", choices=["budget", "cost"], default="budget",
                    help="which threshold scoring uses")
    tr.add_argument("--model", choices=["hgb", "logreg"], default="hgb", help="classifier to train and register")
    tr.add_argument("--no-baseline", action="store_true", help="skip the logistic-regression baseline")
    tr.add_argument("--seed", type=int, default=0, help="random seed of the model")
    tr.set_defaults(func=cmd_train)

    sc = sub.add_parser("score", help="score gold transaction features of a date range with the champion model",
                        description="Score gold_transaction_features of [--from, --to] with the model holding "
                                    "the 'champion' alias and upsert the rows into gold risk_scores.")
    sc.add_argument("--from", dest="date_from", required=True, help="first event date, YYYY-MM-DD (UTC)")
    sc.add_argument("--to", dest="date_to", required=True, help="last event date, YYYY-MM-DD (UTC)")
    sc.set_defaults(func=cmd_score)

    ui = sub.add_parser("ui", help="open the MLflow UI on the tracking store",
                        description="Run `mlflow ui` on the configured store (MLFLOW_TRACKING_URI or mlruns/).")
    ui.add_argument("--port", type=_positive(int), default=5000, help="port to listen on")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind")
    ui.set_defaults(func=cmd_ui)

    dbtp = sub.add_parser("dbt", help="run dbt (the risk marts) against the project's Postgres, e.g. `dbt build`",
                          description="Run dbt in dbt/ with the connection of these settings (embedded Postgres "
                                      "or LAKEHOUSE_PG_DSN); every argument goes to dbt: `lakehouse dbt build`, "
                                      "`lakehouse dbt build --vars '{velocity_max_tx: 6}'`, `lakehouse dbt docs "
                                      "generate`, `lakehouse dbt source freshness`.")
    dbtp.add_argument("dbt_args", nargs=argparse.REMAINDER, help="dbt's command and options")
    dbtp.set_defaults(func=cmd_dbt)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = None
    try:
        try:
            settings = Settings.from_env()
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if args.command not in _READS_ONLY and not (args.command == "pg" and args.action != "start"):
            check_data_root(settings)
        return args.func(args, settings)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130
    except Exception as exc:
        told = _user_error(exc, settings)
        if told is not None:
            # one line on a terminal too (off one, the console never wraps): its path or command is
            # copied from it whole
            console.print(f"[bold red]error:[/] {told}", soft_wrap=True)
            return 2
        raise


def _user_error(exc: Exception, settings: Settings | None) -> Exception | None:
    """``exc`` when it is an error the user can fix with what its message says; a failure caused by a
    damaged Delta table as :class:`lakehouse.damage.DamagedTable`; else None (a bug: the trace)."""
    names = {"JavaMissing", "CheckpointError", "PostgresUnavailable", "PostgresPrivilege", "UserError",
             "ExpectationFailed", "DbtUnavailable", "DamagedTable", "AccessRefused", "InboxFileGone",
             "StreamRunning"}
    if type(exc).__name__ in names:
        return exc
    if settings is None:
        return None
    from lakehouse import damage
    from lakehouse.io import postgres

    # a privilege Postgres refused a job's statement; a full disk before a damaged table: its error
    # may name a table's file, which is not damaged for that
    return (postgres.privilege_refused(exc, settings) or disk_full(exc, settings) or open_files_exhausted(exc)
            or damage.refused(exc, settings) or damage.explain(exc, settings))


if __name__ == "__main__":
    sys.exit(main())

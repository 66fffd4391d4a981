"""Benchmarks (not tests): ingestion throughput, whole-path throughput and freshness, silver MERGE
scaling, model training time and scoring overhead. Writes JSON results.

    python bench/run.py [--events 1000000] [--merge-sizes 1000000,10000000] [--out bench/results]

1. Sustained events/second from inbox to silver for a generated backlog (the whole foreachBatch:
   bronze append, validation, quarantine, in-batch dedup, MERGE, data-quality row).
   Then the whole path (inbox -> silver -> gold in the stream -> Postgres) on the same backlog size,
   and freshness (file landing -> features queryable in Postgres, p50/p95) at a steady live rate.
2. Silver MERGE time per batch when silver already holds 1M and 10M rows. Silver grows by days of
   history at a fixed daily volume, as a real table does; each batch carries new events of the
   latest day plus re-deliveries, so the MERGE reads only the batch's date partitions.
3. Training time (`lakehouse train` defaults: 7/7/7 days) on 30 simulated days, and the scoring
   overhead per micro-batch (champion model, top reasons, MERGE into risk_scores) by batch size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from rich.console import Console

from lakehouse.config import Settings
from lakehouse.laps import wall_seconds

console = Console(stderr=True)
ROWS_PER_DAY = 100_000


def bench_ingest(root: Path, n_events: int, max_files: int) -> dict:
    from lakehouse import streaming, summary
    from lakehouse.generator import GeneratorConfig, generate_backlog
    from lakehouse.spark import build_spark

    settings = Settings.from_env({**os.environ, "LAKEHOUSE_DATA": str(root)}).replace(
        max_files_per_trigger=max_files, stream_gold=False)
    console.print(f"[bold]ingest[/]: generating {n_events:,} events ...")
    t0 = time.time()
    gen = generate_backlog(settings.events_inbox, settings.labels_inbox,
                           GeneratorConfig(seed=1, n_events=n_events, n_users=20_000, n_merchants=2_000, days=7))
    gen_s = time.time() - t0
    console.print(f"  {gen['lines_written']:,} lines in {gen['files']} files ({gen_s:.1f}s)")
    spark = build_spark(settings, app_name="lakehouse-bench")
    streaming.ensure_tables(spark, settings, ("events",))
    batches = []

    def on_batch(r):
        batches.append({"batch_id": r.batch_id, "records_in": r.records_in, "at": time.time(),
                        "step_seconds": r.seconds})
        console.print(f"  batch {r.batch_id}: {r.records_in:,} records ({time.time() - t0:.1f}s) {r.seconds}")

    t0 = time.time()
    streaming.run_streams(spark, settings, once=True, kinds=("events",), on_batch=on_batch)
    seconds = time.time() - t0
    rec = summary.reconciliation(spark, settings)["events"]
    steady = None
    if len(batches) > 2:  # excluding the first batch (JIT warm-up, table snapshot loading)
        n = sum(b["records_in"] for b in batches[1:])
        steady = n / (batches[-1]["at"] - batches[0]["at"])
    return {
        "events_generated": gen["events"], "lines": gen["lines_written"], "generate_seconds": round(gen_s, 1),
        "generate_events_per_second": round(gen["lines_written"] / gen_s),
        "stream_seconds": round(seconds, 1), "batches": len(batches), "max_files_per_trigger": max_files,
        "events_per_second": round(rec["records_in"] / seconds),
        "steady_events_per_second": round(steady) if steady else None,
        "reconciled": rec["reconciled"], "records_in": rec["records_in"], "inserted": rec["inserted"],
        "batch_step_seconds": [b["step_seconds"] for b in batches],
    }


def _pg_count(settings, table: str) -> int:
    from lakehouse.io import postgres

    conn = postgres.connect(settings)
    try:
        with conn.cursor() as cur:
            cur.execute(f'select count(*) from {settings.pg_schema}."{table}"')
            return cur.fetchone()[0]
    finally:
        conn.close()


def bench_whole_path(root: Path, n_events: int, max_files: int) -> dict:
    """Catch-up mode: a backlog of ``n_events`` through inbox -> silver -> gold (in the stream) ->
    Postgres (the mirror's final round); events/second over the whole wall time."""
    from lakehouse import mirror, streaming, summary
    from lakehouse.generator import GeneratorConfig, generate_backlog
    from lakehouse.io import postgres
    from lakehouse.spark import build_spark

    settings = Settings.from_env({**os.environ, "LAKEHOUSE_DATA": str(root)}).replace(
        max_files_per_trigger=max_files, stream_gold=True, stream_scoring=False)
    console.print(f"[bold]whole path[/]: generating {n_events:,} events ...")
    gen = generate_backlog(settings.events_inbox, settings.labels_inbox,
                           GeneratorConfig(seed=2, n_events=n_events, n_users=20_000, n_merchants=2_000, days=7))
    postgres.start(settings)
    spark = build_spark(settings, app_name="lakehouse-bench-path")
    steps = []
    t0 = time.time()
    streaming.run_streams(spark, settings, once=True, on_batch=lambda r: (
        steps.append({"kind": r.kind, "records_in": r.records_in, "seconds": r.seconds}),
        console.print(f"  {r.kind} batch {r.batch_id}: {r.records_in:,} ({time.time() - t0:.1f}s) {r.seconds}")))
    stream_s = time.time() - t0
    mirrored = mirror.mirror_all(spark, settings)
    total_s = time.time() - t0
    rows_pg = _pg_count(settings, "gold_transaction_features")
    rec = summary.reconciliation(spark, settings)["events"]
    postgres.stop(settings)
    return {"events": gen["events"], "lines": gen["lines_written"], "max_files_per_trigger": max_files,
            "stream_seconds": round(stream_s, 1), "mirror_seconds": round(total_s - stream_s, 1),
            "total_seconds": round(total_s, 1), "events_per_second": round(rec["records_in"] / total_s),
            "gold_rows_in_postgres": rows_pg, "reconciled": rec["reconciled"], "batches": steps,
            "mirrored": [{k: m.get(k) for k in ("table", "rows", "version")} for m in mirrored]}


def bench_freshness(root: Path, rate: float, duration_s: float, history_events: int = 0,
                    history_days: float = 7.0, publish: bool = True, express: bool = True) -> dict:
    """Live mode: the generator writes ``rate`` events/s (one file per second) while the stream runs
    continuously with the mirror beside it. Freshness of an event = the first time a reader sees its
    feature row in Postgres minus the time its file landed in the inbox (the file's mtime). The feed
    and the reader (:func:`_watch_features`: asks for the landed events by key, every 0.2 s) run in
    processes of their own.

    ``history_events``: first stream and mirror a backlog of that many events over the
    ``history_days`` before now (the same card holders), so the live micro-batches run on top of
    history as a deployed stream does; only the live events are measured. ``publish``: as
    ``lakehouse stream --mirror`` does, each batch publishes its new gold rows to Postgres as soon as
    they are computed (:class:`lakehouse.mirror.Publisher`); without, only the mirror brings them.
    ``express``: as ``lakehouse stream --mirror`` does, the express lane serves provisional features
    of each landed file (:mod:`lakehouse.express`); the result says how many of them equal the final
    gold row of their event, feature for feature."""
    import threading

    from lakehouse import mirror, streaming
    from lakehouse.generator import GeneratorConfig, generate_backlog
    from lakehouse.io import delta, postgres
    from lakehouse.spark import build_spark

    settings = Settings.from_env({**os.environ, "LAKEHOUSE_DATA": str(root)}).replace(
        stream_gold=True, stream_scoring=False, trigger_seconds=0.5)
    postgres.start(settings)
    spark = build_spark(settings, app_name="lakehouse-bench-fresh")
    streaming.ensure_tables(spark, settings)
    history: dict = {}
    if history_events:
        now = datetime.now(timezone.utc)
        console.print(f"[bold]freshness[/]: streaming a history of {history_events:,} events first ...")
        gen = generate_backlog(settings.events_inbox, settings.labels_inbox, GeneratorConfig(
            seed=3, n_users=20_000, n_events=history_events, days=history_days,
            start=now - timedelta(days=history_days)))
        t0 = time.time()
        streaming.run_streams(spark, settings.replace(max_files_per_trigger=10_000), once=True)
        t1 = time.time()
        mirror.mirror_all(spark, settings)
        history = {"events": gen["events"], "days": history_days, "stream_seconds": round(t1 - t0, 1),
                   "mirror_seconds": round(time.time() - t1, 1)}
    backlog_files = {f.name for f in settings.events_inbox.glob("*.jsonl")}
    # The feed and the reader run in processes of their own, as a producer and a reader of Postgres
    # do: in this one they would take the interpreter's lock from the stream and the lane.
    mp = multiprocessing.get_context("spawn")
    watch_stop = mp.Event()
    seen_path, fed_path = root / "bench-seen.json", root / "bench-fed.json"
    watcher = mp.Process(target=_watch_features, name="bench-watch", daemon=True, args=(
        postgres.resolve_dsn(settings), f"{settings.pg_schema}.gold_transaction_features",
        str(settings.events_inbox), sorted(backlog_files), watch_stop, str(seen_path)))
    loop = mirror.MirrorLoop(spark, settings, interval=0.2, tables=("gold_transaction_features",))
    publisher = mirror.Publisher(settings) if publish else None
    from lakehouse.express import ExpressLane

    lane = ExpressLane(settings, keep_published=True) if publish and express else None
    stream_stop = threading.Event()
    batches: list[dict] = []

    def on_batch(r) -> None:
        batches.append({"records_in": r.records_in, "seconds": r.seconds, "ended_at": time.time()})
        console.print(f"  batch {r.batch_id}: {r.records_in:,} records, {wall_seconds(r.seconds):.1f}s "
                      f"(gold {r.seconds.get('gold', 0):.1f}s)")

    streamer = threading.Thread(target=lambda: streaming.run_streams(
        spark, settings, once=False, kinds=("events",), stop_event=stream_stop, on_batch=on_batch,
        publish=publisher.submit if publisher else None, express=lane), daemon=True)
    if publisher:
        publisher.start()
    streamer.start()
    loop.start()
    watcher.start()
    console.print(f"[bold]freshness[/]: {rate:.0f} events/s for {duration_s:.0f}s ...")
    feeder = mp.Process(target=_feed, name="bench-feed", args=(
        str(settings.events_inbox), str(settings.labels_inbox), GeneratorConfig(seed=3, n_users=20_000),
        rate, duration_s, str(fed_path)))
    feeder.start()
    feeder.join()
    if feeder.exitcode != 0:
        raise RuntimeError(f"the live feed failed (exit code {feeder.exitcode})")
    gen = json.loads(fed_path.read_text())
    time.sleep(30)  # let the tail drain
    stream_stop.set()
    streamer.join(300)
    if publisher:
        publisher.stop()
    loop.stop()
    watch_stop.set()
    watcher.join(60)
    if watcher.exitcode != 0 or not seen_path.exists():
        raise RuntimeError(f"the freshness reader failed (exit code {watcher.exitcode})")
    seen: dict[str, float] = json.loads(seen_path.read_text())
    landed = {}
    for f in settings.events_inbox.glob("*.jsonl"):
        if f.name not in backlog_files:  # only live files are measured
            landed[f.name] = f.stat().st_mtime
    rows = (delta.read(spark, settings.table_path("silver_transactions")).select("event_id", "source_file")
            .collect())
    timed = [(landed[Path(r["source_file"]).name], seen[r["event_id"]]) for r in rows
             if r["event_id"] in seen and Path(r["source_file"]).name in landed]
    provisional = None
    if lane is not None:  # the provisional rows against gold's final ones, feature for feature
        import pyarrow as pa

        served = pa.concat_tables(lane.published_rows).to_pandas() if lane.published_rows else None
        equal = 0
        if served is not None:
            final = (delta.read(spark, settings.table_path("gold_transaction_features")).toPandas()
                     .set_index("event_id"))
            served = served.set_index("event_id")
            common = served.index.intersection(final.index)
            from lakehouse.transforms.features import FEATURE_COLUMNS

            cols = ["amount_base", *FEATURE_COLUMNS]
            a, b = served.loc[common, cols], final.loc[common, cols]
            eq = a.eq(b) | (a.isna() & b.isna())
            equal = int(eq.all(axis=1).sum())
            by_feature = {c: round(float(eq[c].mean()), 4) for c in cols} if len(eq) else {}
        # A provisional row is computed from the events landed so far; the final gold row also counts
        # the events that landed after it with earlier event times (out of order, late): the share of
        # rows, and of each feature, that the later events left unchanged.
        provisional = {**lane.stats, "equal_to_final_gold": equal,
                       "equal_share": round(equal / max(1, lane.stats["rows_published"]), 4),
                       "equal_share_by_feature": by_feature if served is not None else {}}
    lat = sorted(s - at for at, s in timed)
    # The first micro-batch of a started stream pays one-time costs (JIT warm-up, table snapshots,
    # the first look-back); the events that land after it ended show the running stream's freshness.
    steady = sorted(s - at for at, s in timed if at > batches[0]["ended_at"]) if batches else []
    postgres.stop(settings)

    def q(p: float, values=lat):
        return round(values[min(len(values) - 1, int(p * len(values)))], 2) if values else None

    return {"rate_per_second": rate, "duration_seconds": duration_s, "history": history,
            "events_written": gen.get("events"),
            "events_measured": len(lat), "freshness_p50_seconds": q(0.50), "freshness_p95_seconds": q(0.95),
            "freshness_max_seconds": round(lat[-1], 2) if lat else None,
            "after_first_batch": {"events_measured": len(steady), "freshness_p50_seconds": q(0.50, steady),
                                  "freshness_p95_seconds": q(0.95, steady)},
            "mirror_rounds": loop.rounds,
            "express": provisional,
            "published_ahead": None if publisher is None else {
                "rows": publisher.published, "skipped": publisher.skipped, "dropped": publisher.dropped},
            "batches": len(batches), "batch_seconds_p50": _median([wall_seconds(b["seconds"]) for b in batches]),
            "first_batch_seconds": wall_seconds(batches[0]["seconds"]) if batches else None,
            "step_seconds_median": {k: _median([b["seconds"].get(k, 0.0) for b in batches])
                                    for k in sorted({k for b in batches for k in b["seconds"]})}}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _feed(events_dir: str, labels_dir: str, config, rate: float, duration_s: float, out: str) -> None:
    """The freshness benchmark's live feed (a process of its own): ``run_live``'s summary to ``out``."""
    from lakehouse.generator.live import run_live

    Path(out).write_text(json.dumps(run_live(events_dir, labels_dir, config, rate=rate, duration_s=duration_s)))


def _watch_features(dsn: str, table: str, inbox: str, skip: list[str], stop, out: str,
                    interval: float = 0.2, give_up_s: float = 120.0) -> None:
    """The freshness benchmark's reader (a process of its own): every ``interval`` seconds, asks
    Postgres which of the events landed in ``inbox`` (files not in ``skip``) and not seen yet have a
    row in ``table``, by its primary key; writes {event_id: first time seen} to ``out`` once
    ``stop`` is set. An event not seen ``give_up_s`` after its file was found (an invalid or
    quarantined line) is no longer asked for."""
    import psycopg2

    done, asked, seen = set(skip), {}, {}
    conn = None
    while True:
        last = stop.is_set()
        now = time.time()
        for e in (os.scandir(inbox) if os.path.isdir(inbox) else ()):
            if e.name in done or not e.name.endswith(".jsonl") or not e.is_file():
                continue
            done.add(e.name)
            try:
                data = Path(e.path).read_bytes()
            except OSError:
                continue
            for line in data.splitlines():
                try:
                    eid = json.loads(line).get("event_id")
                except (ValueError, AttributeError):
                    continue
                if isinstance(eid, str) and eid not in seen:
                    asked.setdefault(eid, now)
        asked = {k: v for k, v in asked.items() if now - v < give_up_s}
        try:
            if conn is None:
                conn = psycopg2.connect(dsn)
                conn.autocommit = True
            if asked:
                with conn.cursor() as cur:
                    cur.execute(f"select event_id from {table} where event_id = any(%s)", (list(asked),))
                    found = cur.fetchall()
                at = time.time()
                for (eid,) in found:
                    seen.setdefault(eid, at)
                    asked.pop(eid, None)
        except psycopg2.Error:  # the table not there yet, or the server restarting
            conn = None
        if last:
            break
        time.sleep(interval)
    Path(out).write_text(json.dumps(seen))


def _silver_rows(spark, n: int, first_day: date, offset: int = 0):
    from pyspark.sql import functions as F

    days = max(1, n // ROWS_PER_DAY)
    return (
        spark.range(offset, offset + n)
        .withColumn("day", (F.col("id") - offset) % days)
        .select(
            F.format_string("e%012d", "id").alias("event_id"),
            F.format_string("u%06d", F.col("id") % 50_000).alias("user_id"),
            F.format_string("m%05d", F.col("id") % 3_000).alias("merchant_id"),
            (F.col("id") % 500 + 1).cast("double").alias("amount"),
            F.lit("USD").alias("currency"),
            (F.col("id") % 500 + 1).cast("double").alias("amount_base"),
            F.lit("US").alias("country"),
            (F.lit(datetime.combine(first_day, datetime.min.time())).cast("timestamp")
             + F.make_interval(days=F.col("day").cast("int"), secs=(F.col("id") % 86_400).cast("decimal(18,6)")))
            .alias("event_time"),
        )
        .withColumn("event_date", F.to_date("event_time"))
        .withColumn("source_file", F.lit("bench"))
        .withColumn("batch_id", F.lit(-1).cast("long"))
        .withColumn("ingested_at", F.current_timestamp())
    )


def bench_merge(root: Path, sizes: list[int], batch_rows: int, repeats: int) -> dict:
    from pyspark.sql import functions as F

    from lakehouse import streaming
    from lakehouse.io import delta
    from lakehouse.spark import build_spark

    settings = Settings.from_env({**os.environ, "LAKEHOUSE_DATA": str(root)})
    spark = build_spark(settings, app_name="lakehouse-bench")
    out = {}
    for size in sizes:
        s = settings.with_data_root(root / f"merge-{size}")
        streaming.ensure_tables(spark, s, ("events",))
        path = s.table_path("silver_transactions")
        days = max(1, size // ROWS_PER_DAY)
        first_day = date(2026, 1, 1)
        console.print(f"[bold]merge[/]: loading silver with {size:,} rows over {days} days ...")
        t0 = time.time()
        _silver_rows(spark, size, first_day).write.format("delta").mode("append").save(str(path))
        console.print(f"  loaded in {time.time() - t0:.1f}s")
        last_day = first_day + timedelta(days=days - 1)
        timings = []
        for rep in range(repeats):
            new = _silver_rows(spark, batch_rows, last_day, offset=10**11 + rep * batch_rows)
            redeliveries = (delta.read(spark, path).where(F.col("event_date") == F.lit(last_day))
                            .limit(batch_rows // 20))
            batch = new.unionByName(redeliveries).withColumn("batch_id", F.lit(rep).cast("long")).cache()
            batch.count()
            dates = [r[0] for r in batch.select("event_date").distinct().collect()]
            t0 = time.time()  # as the stream does: keys among the batch's dates and those around them
            delta.merge_insert_new(spark, batch, path, ("event_id",),
                                   {"event_date": streaming.dates_around(dates, settings.redelivery_days)})
            timings.append(time.time() - t0)
            batch.unpersist()
            console.print(f"  batch {rep}: {timings[-1]:.2f}s")
        out[str(size)] = {"silver_rows": size, "days": days, "batch_rows": batch_rows + batch_rows // 20,
                          "merge_seconds": [round(t, 3) for t in timings],
                          "median_seconds": round(statistics.median(timings[1:] or timings), 3)}
    if len(sizes) >= 2:
        a, b = out[str(sizes[0])]["median_seconds"], out[str(sizes[-1])]["median_seconds"]
        out["ratio_largest_to_smallest"] = round(b / a, 3)
    return out


def bench_model(root: Path, days: int, users: int, batch_sizes: list[int], repeats: int) -> dict:
    """Training time on ``days`` simulated days (7/7/7 split), then the scoring overhead per micro-batch:
    Scorer.score + write_scores (MERGE into risk_scores, with top reasons) for batches of gold
    feature rows of the given sizes."""
    from pyspark.sql import functions as F

    from lakehouse import streaming
    from lakehouse.generator import GeneratorConfig, generate_backlog
    from lakehouse.io import delta
    from lakehouse.ml import scorer as scorer_mod, train
    from lakehouse.transforms import features
    from lakehouse.spark import build_spark

    settings = Settings.from_env({**os.environ, "LAKEHOUSE_DATA": str(root), "LAKEHOUSE_STREAM_GOLD": "0",
                                  "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlruns/mlflow.db"})
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    console.print(f"[bold]model[/]: generating {days} days for {users:,} users, streaming, computing features ...")
    t0 = time.time()
    gen = generate_backlog(settings.events_inbox, settings.labels_inbox,
                           GeneratorConfig(seed=5, days=days, n_users=users, start=start))
    spark = build_spark(settings, app_name="lakehouse-bench")
    streaming.run_streams(spark, settings, once=True)
    last = (start + timedelta(days=days) - timedelta(microseconds=1)).date()
    # only the table the model reads, with the pipeline's feature function
    silver = delta.read(spark, settings.table_path("silver_transactions"))
    labels = delta.read(spark, settings.table_path("silver_labels"))
    (features.transaction_features(silver, silver, labels).write.format("delta").partitionBy("event_date")
     .save(str(settings.table_path("gold_transaction_features"))))
    prep_s = time.time() - t0
    console.print(f"  {gen['events']:,} events ready in {prep_s:.1f}s; training ...")
    t0 = time.time()
    result = train.train(spark, settings, train.TrainConfig(), progress=lambda t: console.print(f"  {t}"))
    train_s = time.time() - t0
    console.print(f"  trained in {train_s:.1f}s: {result.summary()['average_precision']} AP")

    scorer = scorer_mod.Scorer(spark, settings)
    feats = delta.read(spark, settings.table_path("gold_transaction_features"))
    timings = {}
    for size in batch_sizes:
        runs = []
        for rep in range(repeats):
            batch = feats.where(F.col("event_date") == F.lit(last)).limit(size).persist()
            n = batch.count()
            t0 = time.time()
            written = scorer_mod.write_scores(spark, settings, scorer.score(batch), "bench-scoring", size * 100 + rep)
            runs.append(time.time() - t0)
            batch.unpersist()
            console.print(f"  scoring batch of {n:,} rows: {runs[-1]:.2f}s ({written} rows)")
        med = statistics.median(runs[1:] or runs)
        timings[str(size)] = {"rows": n, "seconds": [round(r, 3) for r in runs], "median_seconds": round(med, 3),
                              "ms_per_row": round(1000 * med / max(n, 1), 3)}
    return {
        "days": days, "users": users, "events": gen["events"], "prepare_seconds": round(prep_s, 1),
        "train_seconds_total": round(train_s, 1), "train_seconds_by_step": result.seconds,
        "n_test": int(result.metrics["n_test"]), "windows": result.windows,
        "average_precision": round(result.metrics["average_precision"], 4),
        "roc_auc": round(result.metrics["roc_auc"], 4),
        "precision_at_100_per_day": round(result.metrics["precision_at_100_per_day"], 4),
        "fraud_rate_test": round(result.metrics["fraud_rate"], 5),
        "scoring_per_micro_batch": timings,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000, help="backlog size for the ingest benchmark")
    p.add_argument("--max-files", type=int, default=Settings.from_env().max_files_per_trigger,
                   help="inbox files per micro-batch (default: the stream's setting)")
    p.add_argument("--merge-sizes", default="1000000,10000000", help="silver sizes for the MERGE benchmark")
    p.add_argument("--merge-batch", type=int, default=100_000, help="new rows per MERGE batch")
    p.add_argument("--repeats", type=int, default=4, help="MERGE batches per size (the first is warm-up)")
    p.add_argument("--model-days", type=int, default=30, help="simulated days for the training benchmark")
    p.add_argument("--model-users", type=int, default=2000, help="simulated card holders for the training benchmark")
    p.add_argument("--score-batches", default="1000,5000", help="micro-batch sizes (rows) for the scoring overhead")
    p.add_argument("--skip", action="append", choices=["ingest", "path", "freshness", "merge", "model"], default=[],
                   help="skip a benchmark")
    p.add_argument("--rate", type=float, default=1000.0, help="live events/second for the freshness benchmark")
    p.add_argument("--live-seconds", type=float, default=180.0, help="how long the freshness benchmark feeds")
    p.add_argument("--live-history", type=int, default=0,
                   help="events of history (over the 7 days before now) streamed before the live feed")
    p.add_argument("--no-publish", action="store_true",
                   help="freshness without publishing each batch's gold rows ahead of the mirror")
    p.add_argument("--no-express", action="store_true",
                   help="freshness without the express lane (provisional features ahead of each batch)")
    p.add_argument("--out", default="bench/results", help="folder for the JSON result")
    args = p.parse_args(argv)

    result = {"started_at": datetime.now(timezone.utc).isoformat(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "machine": platform.machine()}
    with tempfile.TemporaryDirectory(prefix="lakehouse-bench-") as tmp:
        if "ingest" not in args.skip:
            result["ingest"] = bench_ingest(Path(tmp) / "ingest", args.events, args.max_files)
        if "path" not in args.skip:
            result["whole_path"] = bench_whole_path(Path(tmp) / "path", args.events, args.max_files)
        if "freshness" not in args.skip:
            result["freshness"] = bench_freshness(Path(tmp) / "fresh", args.rate, args.live_seconds,
                                                  history_events=args.live_history, publish=not args.no_publish,
                                                  express=not args.no_express)
        if "merge" not in args.skip:
            sizes = [int(x) for x in args.merge_sizes.split(",") if x]
            result["merge"] = bench_merge(Path(tmp), sizes, args.merge_batch, args.repeats)
        if "model" not in args.skip:
            result["model"] = bench_model(Path(tmp) / "model", args.model_days, args.model_users,
                                          [int(x) for x in args.score_batches.split(",") if x], args.repeats)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    console.print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

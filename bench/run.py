"""Benchmarks (not tests): ingestion throughput and silver MERGE scaling. Writes JSON results.

    python bench/run.py [--events 1000000] [--merge-sizes 1000000,10000000] [--out bench/results]

1. Sustained events/second from inbox to silver for a generated backlog (the whole foreachBatch:
   bronze append, validation, quarantine, in-batch dedup, MERGE, data-quality row).
2. Silver MERGE time per batch when silver already holds 1M and 10M rows. Silver grows by days of
   history at a fixed daily volume, as a real table does; each batch carries new events of the
   latest day plus re-deliveries, so the MERGE reads only the batch's date partitions.
"""

from __future__ import annotations

import argparse
import json
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

console = Console(stderr=True)
ROWS_PER_DAY = 100_000


def bench_ingest(root: Path, n_events: int, max_files: int) -> dict:
    from lakehouse import streaming, summary
    from lakehouse.generator import GeneratorConfig, generate_backlog
    from lakehouse.spark import build_spark

    settings = Settings.from_env({**os.environ, "LAKEHOUSE_DATA": str(root)}).replace(max_files_per_trigger=max_files)
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
            dates = [str(r[0]) for r in batch.select("event_date").distinct().collect()]
            t0 = time.time()
            delta.merge_insert_new(spark, batch, path, ("event_date", "event_id"), {"event_date": dates})
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000, help="backlog size for the ingest benchmark")
    p.add_argument("--max-files", type=int, default=Settings.from_env().max_files_per_trigger,
                   help="inbox files per micro-batch (default: the stream's setting)")
    p.add_argument("--merge-sizes", default="1000000,10000000", help="silver sizes for the MERGE benchmark")
    p.add_argument("--merge-batch", type=int, default=100_000, help="new rows per MERGE batch")
    p.add_argument("--repeats", type=int, default=4, help="MERGE batches per size (the first is warm-up)")
    p.add_argument("--skip", action="append", choices=["ingest", "merge"], default=[], help="skip a benchmark")
    p.add_argument("--out", default="bench/results", help="folder for the JSON result")
    args = p.parse_args(argv)

    result = {"started_at": datetime.now(timezone.utc).isoformat(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "machine": platform.machine()}
    with tempfile.TemporaryDirectory(prefix="lakehouse-bench-") as tmp:
        if "ingest" not in args.skip:
            result["ingest"] = bench_ingest(Path(tmp) / "ingest", args.events, args.max_files)
        if "merge" not in args.skip:
            sizes = [int(x) for x in args.merge_sizes.split(",") if x]
            result["merge"] = bench_merge(Path(tmp), sizes, args.merge_batch, args.repeats)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    console.print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

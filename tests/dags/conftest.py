"""Airflow for the DAG tests: a private AIRFLOW_HOME (set before Airflow is first imported)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DAGS_FOLDER = ROOT / "orchestration" / "dags"

if "AIRFLOW_HOME" not in os.environ or not os.environ["AIRFLOW_HOME"].startswith(tempfile.gettempdir()):
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="airflow-home-")
    atexit.register(shutil.rmtree, os.environ["AIRFLOW_HOME"], True)  # not left behind in /tmp
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "false"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS_FOLDER)

"""The dbt runner's environment: the profile's variables come from Settings (embedded or DSN)."""

from __future__ import annotations

from pathlib import Path

import yaml

from lakehouse.config import Settings
from lakehouse.io import dbt, postgres


def test_embedded_postgres_is_a_socket_directory_without_password(tmp_path):
    settings = Settings.from_env({"LAKEHOUSE_DATA": str(tmp_path / "data")})
    env = dbt.dbt_env(settings, base={})
    assert env["LAKEHOUSE_PG_HOST"] == str(postgres.socket_dir(settings))
    assert (env["LAKEHOUSE_PG_USER"], env["LAKEHOUSE_PG_DBNAME"], env["LAKEHOUSE_PG_PASSWORD"]) == \
        ("postgres", "lakehouse", "")
    assert env["LAKEHOUSE_PG_SCHEMA"] == "lakehouse"
    assert env["DBT_TARGET_PATH"] == str(tmp_path / "data" / "dbt" / "target")
    assert Path(env["DBT_PROFILES_DIR"], "profiles.yml").exists()


def test_external_dsn_fills_every_profile_field(tmp_path):
    settings = Settings.from_env({"LAKEHOUSE_DATA": str(tmp_path),
                                  "LAKEHOUSE_PG_DSN": "postgresql://ana:s3cret@db.example:6543/risk?sslmode=require",
                                  "LAKEHOUSE_PG_SCHEMA": "serving"})
    env = dbt.dbt_env(settings, base={"LAKEHOUSE_DBT_SCHEMA": "marts_dev"})
    assert {k: env[k] for k in ("LAKEHOUSE_PG_HOST", "LAKEHOUSE_PG_PORT", "LAKEHOUSE_PG_USER",
                                "LAKEHOUSE_PG_PASSWORD", "LAKEHOUSE_PG_DBNAME", "LAKEHOUSE_PG_SSLMODE",
                                "LAKEHOUSE_PG_SCHEMA", "LAKEHOUSE_DBT_SCHEMA")} == {
        "LAKEHOUSE_PG_HOST": "db.example", "LAKEHOUSE_PG_PORT": "6543", "LAKEHOUSE_PG_USER": "ana",
        "LAKEHOUSE_PG_PASSWORD": "s3cret", "LAKEHOUSE_PG_DBNAME": "risk", "LAKEHOUSE_PG_SSLMODE": "require",
        "LAKEHOUSE_PG_SCHEMA": "serving", "LAKEHOUSE_DBT_SCHEMA": "marts_dev"}


def test_profile_reads_only_environment_variables():
    """No connection value or secret is committed: every field of the profile is an env_var()."""
    profile = yaml.safe_load((dbt.project_dir() / "profiles.yml").read_text())
    output = profile["lakehouse"]["outputs"]["default"]
    for key in ("host", "port", "user", "password", "dbname", "schema"):
        assert "env_var(" in str(output[key]), key

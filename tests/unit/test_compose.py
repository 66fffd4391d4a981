"""docker-compose.yml, checked for structure (no Docker engine here): the services the README
promises, pinned images, healthchecks, named volumes, loopback-only ports, secrets from .env."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {"postgres", "mlflow", "airflow-init", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "spark-master", "spark-worker"}
ONE_SHOT = {"airflow-init"}
SECRETS = ("PASSWORD", "SECRET", "FERNET_KEY")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _pinned(image: str) -> bool:
    """name:tag with a real version tag (digits), never latest; or an @sha256 digest."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and re.search(r"\d", tag) is not None


def test_pinned_helper_rejects_floating_tags():
    assert _pinned("postgres:18.1") and _pinned("ghcr.io/mlflow/mlflow:v3.17.2")
    assert not _pinned("postgres") and not _pinned("postgres:latest") and not _pinned("localhost:5000/x")
    assert not _pinned("apache/spark:stable")


def test_required_services_exist(compose):
    assert REQUIRED <= set(compose["services"])


def test_every_image_is_pinned(compose):
    for name, svc in compose["services"].items():
        assert "image" in svc, f"{name}: no image"
        assert _pinned(svc["image"]), f"{name}: image {svc['image']!r} is not pinned to a version"
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.M)
    assert bases
    for base in bases:
        assert _pinned(base), f"Dockerfile base image {base!r} is not pinned"


def test_long_running_services_have_healthchecks(compose):
    for name, svc in compose["services"].items():
        if name in ONE_SHOT:
            continue
        check = svc.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name}: no healthcheck"


def test_airflow_runs_local_executor_on_postgres(compose):
    env = compose["services"]["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql")
    assert "@postgres:5432/" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    mlflow_cmd = " ".join(compose["services"]["mlflow"]["command"])
    assert "--backend-store-uri=postgresql://" in mlflow_cmd and "mlflow-artifacts:/mlartifacts" in \
        compose["services"]["mlflow"]["volumes"]


def test_named_volumes_are_declared_and_used(compose):
    declared = set(compose.get("volumes") or {})
    assert {"postgres-data", "mlflow-artifacts", "lakehouse-data"} <= declared
    used = set()
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source")
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source!r} is not declared"
                used.add(source)
    assert used == declared


def test_published_ports_bind_loopback_only(compose):
    seen = 0
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            seen += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert re.fullmatch(r"127\.0\.0\.1:\d+:\d+(/tcp|/udp)?", str(port)), \
                    f"{name}: port {port!r} is not bound to 127.0.0.1"
        assert svc.get("network_mode") != "host", f"{name}: host networking bypasses the port bindings"
    assert seen >= 4


def _walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


def test_secrets_come_from_env_without_defaults(compose):
    checked = 0
    for path, value in _walk(compose["services"]):
        key = path.rsplit(".", 1)[-1]
        if any(s in key for s in SECRETS) and "FILE" not in key:
            checked += 1
            assert isinstance(value, str) and re.fullmatch(r"\$\{[A-Z_]+(:\?[^}]*)?\}", value), \
                f"{path}: secret must be a ${{VAR}} reference without a default, got {value!r}"
        if isinstance(value, str):
            # credentials inside URLs / DSNs must be references too
            for m in re.finditer(r"password=([^\s\"']+)|://[^:/@\s]+:([^@\s/]+)@", value):
                assert (m.group(1) or m.group(2)).startswith("${"), f"{path}: literal credential in {value!r}"
            assert ":-" not in value or not any(s in value.upper() for s in SECRETS), path
    assert checked >= 4
    for path in ROOT.glob("docker/**/*"):
        if path.is_file():
            assert not re.search(r"(?i)password\s*=\s*['\"]?\w", path.read_text()), path


def test_env_file_is_ignored_and_example_is_complete(compose):
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    referenced = set(re.findall(r"(?<!\$)\$\{([A-Z_]+)", (ROOT / "docker-compose.yml").read_text()))
    assert referenced <= set(example), f"missing in .env.example: {referenced - set(example)}"
    tracked = subprocess.run(["git", "ls-files", ".env"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.returncode != 0 or tracked.stdout.strip() == "", ".env must never be committed"


def test_the_dags_spark_submit_gives_the_driver_the_heap_lakehouse_is_sized_for(compose):
    from lakehouse.config import Settings
    from lakehouse.spark import memory_bytes

    words = compose["x-lakehouse-env"]["LAKEHOUSE_SPARK_SUBMIT"].split()
    assert "--driver-memory" in words, "spark-submit's default driver has 1g"
    given = words[words.index("--driver-memory") + 1]
    assert memory_bytes(given) >= memory_bytes(Settings.from_env({}).driver_memory)

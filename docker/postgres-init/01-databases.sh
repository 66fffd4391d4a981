#!/bin/bash
# First start of the compose Postgres: one database per consumer. POSTGRES_DB (lakehouse) is
# created by the image itself; it holds the serving schema `lakehouse` and the dbt marts.
set -euo pipefail
for db in airflow mlflow; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
       -c "CREATE DATABASE ${db} OWNER \"${POSTGRES_USER}\""
done

"""spark-submit entry point of any `lakehouse` command: the first argument names it.

    spark-submit --master spark://host:7077 --driver-memory 4g --packages io.delta:delta-spark_4.2_2.13:4.4.0 \\
        jobs/cli.py backfill --from 2026-11-01 --to 2026-11-07

`spark-submit ... jobs/cli.py <command> <args>` runs exactly what `lakehouse <command> <args>`
runs, on the cluster spark-submit points at. The Airflow DAG uses it as the command prefix when
LAKEHOUSE_SPARK_SUBMIT is set (see docker-compose.yml).
"""

import sys

from lakehouse.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""spark-submit entry point of the gold backfill.

    spark-submit --packages io.delta:delta-spark_4.2_2.13:4.4.0 jobs/backfill.py --from 2026-11-01 --to 2026-11-07

Takes the same arguments as `lakehouse backfill` (see `--help`) and runs the same code.
"""

import sys

from lakehouse.cli import main

if __name__ == "__main__":
    sys.exit(main(["backfill", *sys.argv[1:]]))

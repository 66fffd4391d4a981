"""spark-submit entry point of `lakehouse maintain`.

    spark-submit --packages io.delta:delta-spark_4.2_2.13:4.4.0 jobs/maintain.py

Takes the same arguments as `lakehouse maintain` (see `--help`) and runs the same code.
"""

import sys

from lakehouse.cli import main

if __name__ == "__main__":
    sys.exit(main(["maintain", *sys.argv[1:]]))

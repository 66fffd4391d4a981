"""spark-submit entry point of `lakehouse mirror`.

    spark-submit --packages io.delta:delta-spark_4.2_2.13:4.4.0 jobs/mirror.py

Takes the same arguments as `lakehouse mirror` (see `--help`) and runs the same code.
"""

import sys

from lakehouse.cli import main

if __name__ == "__main__":
    sys.exit(main(["mirror", *sys.argv[1:]]))

"""spark-submit entry point of the ingestion stream: inbox -> bronze -> silver, exactly once.

    spark-submit --packages io.delta:delta-spark_4.2_2.13:4.4.0 jobs/stream.py --once

Takes the same arguments as `lakehouse stream` (see `--help`) and runs the same code.
"""

import sys

from lakehouse.cli import main

if __name__ == "__main__":
    sys.exit(main(["stream", *sys.argv[1:]]))

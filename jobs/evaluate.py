"""Job entry point: `ray job submit --working-dir . -- python jobs/evaluate.py ...`; same flags as `leukray evaluate`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # leukray from this checkout / job working dir

from leukray.cli import console  # noqa: E402

if __name__ == "__main__":
    sys.exit(console(["evaluate", *sys.argv[1:]]))

"""Entry point for ``ray job submit --working-dir . -- python jobs/reposts.py OUT``.

Grouping runs on the driver (one machine; see docs/architecture.md for the distributed design); the
job form lets it run next to the cluster's storage.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aidetect_batch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["reposts", *sys.argv[1:]]))

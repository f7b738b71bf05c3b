"""Entry point for ``ray job submit --working-dir . -- python jobs/prune.py --checkpoint C --dataset D --out OUT``.

``ray.init()`` inside the job connects to the cluster named by ``RAY_ADDRESS``
(set by ``ray job submit``) and starts a local instance otherwise.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aidetect_batch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["prune", *sys.argv[1:]]))

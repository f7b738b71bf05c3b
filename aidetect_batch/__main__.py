import sys

from aidetect_batch.cli import main

sys.exit(main())

import sys

from backends.worker.server import main

sys.exit(main())

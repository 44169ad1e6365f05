"""`python -m backends.worker`: one backend worker (backends.worker.server). Imports
nothing from the gateway."""

import sys

from backends.worker.server import main

sys.exit(main())

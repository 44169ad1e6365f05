"""`python -m backends.demo`: builds the demo model repository (backends.demo.models).
Imports nothing from the gateway."""

import sys

from backends.demo.models import main

sys.exit(main())

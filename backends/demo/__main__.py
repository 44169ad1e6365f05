import sys

from backends.demo.models import main

sys.exit(main())

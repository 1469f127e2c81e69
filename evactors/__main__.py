"""``python -m evactors``: the command line (``bin/evactors``)."""

import sys

from evactors.cli.main import main

sys.exit(main())

"""``python -m evactors.cli``: what ``bin/evactors`` runs."""

import sys

from evactors.cli.main import main

sys.exit(main())

"""``python -m stability`` is the ``lsnn`` command."""

import sys

from stability.cli import main

sys.exit(main())

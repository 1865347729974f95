"""``python -m medseg``: the medseg command."""

import sys

from .cli import main

sys.exit(main())

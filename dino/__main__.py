"""``python -m dino``: the ``dino`` command."""

import sys

from dino.cli import main

sys.exit(main())

"""``python -m fastgrad``: the same as the ``fastgrad`` command."""

import sys

from .tools.cli import main

sys.exit(main())

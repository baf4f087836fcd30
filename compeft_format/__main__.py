"""``python -m compeft_format``: the ``compeft`` command."""

import sys

from .cli import main

sys.exit(main())

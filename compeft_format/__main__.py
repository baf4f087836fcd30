"""``python -m compeft_format``: the ``compeft`` command."""

import sys

from .cli import main

if __name__ == "__main__":  # not when a worker process imports it
    sys.exit(main())

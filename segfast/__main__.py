"""``python -m segfast ...``: the ``segfast`` command (segfast/cli/main.py)."""

import sys

from segfast.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

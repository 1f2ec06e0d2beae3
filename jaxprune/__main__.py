"""``python -m jaxprune``: the command line."""

import sys

from jaxprune.cli import main

if __name__ == "__main__":
    sys.exit(main())

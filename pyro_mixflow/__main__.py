"""``python -m pyro_mixflow``: the command line."""

import sys

from pyro_mixflow.cli import main

if __name__ == "__main__":
    sys.exit(main())

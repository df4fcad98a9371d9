"""``python -m rudalle_pipe ...``: the same command line as ``rudalle-pipe``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

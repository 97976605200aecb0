"""``python -m fastclip ...``: the ``fastclip`` command (fastclip.cli.main), for when the console script
is not on PATH."""
import sys

from fastclip.cli import main

if __name__ == "__main__":  # not on a plain import (e.g. pkgutil.walk_packages importing every module)
    sys.exit(main())

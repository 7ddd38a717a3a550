"""``python -m rollouttap``: the ``rollouttap`` command."""

import sys

from rollouttap.cli import main

if __name__ == "__main__":  # imported (pydoc, a module walker), it runs nothing
    sys.exit(main())

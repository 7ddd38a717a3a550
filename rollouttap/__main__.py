"""``python -m rollouttap``: the ``rollouttap`` command."""

import sys

from rollouttap.cli import main

sys.exit(main())

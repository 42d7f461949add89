"""``python -m edgetp.cli``: the ``edgetp`` command."""

import sys

from edgetp.cli.main import main

sys.exit(main())

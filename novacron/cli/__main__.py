"""``python -m novacron.cli``: the ``novacron`` command."""

import sys

from novacron.cli import main

sys.exit(main())

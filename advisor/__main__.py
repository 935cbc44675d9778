"""``python -m advisor``: the same as the ``advisor`` console script."""

import sys

from advisor.cli import main


sys.exit(main())

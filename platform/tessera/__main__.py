"""`python -m tessera ...`: the `tessera` command (tessera.cli) without its console script."""

import sys

from tessera.cli import main

sys.exit(main())

"""`python -m planner ...`: the same CLI as the `planner` command (planner/cli.py)."""

import sys

from planner.cli import main

sys.exit(main())

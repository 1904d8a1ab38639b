"""`python -m osteoscreen.cli`: the same as the `osteoscreen` command."""

import sys

from osteoscreen.cli import main

sys.exit(main())

"""``python -m invardiff``: the same as ``invardiff`` (a shim: the command line is assembled in
the top-level ``invardiff_cli`` package; allowed upward import)."""

import sys

from invardiff_cli.engine_commands import invardiff_main

sys.exit(invardiff_main())

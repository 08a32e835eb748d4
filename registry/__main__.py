"""``python -m registry``: the same as ``invardiff-registry``."""

from .cli import main

main()

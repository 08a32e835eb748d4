"""``python -m registry``: the same as ``invardiff-registry`` (a shim: the command line is
assembled in the top-level ``invardiff_cli`` package; allowed upward import)."""

from invardiff_cli.registry_app import registry_main

registry_main(prog_name="invardiff-registry")

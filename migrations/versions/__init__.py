"""The schema's migrations, one file each, numbered in the order of the chain.

A file's number is its place in the chain; the revision id inside is the one first released
and never changes, since databases record it. Four files were renumbered when two were both
0002: ``0003_validation.py`` holds revision ``0002_validation``, ``0004_fleet.py`` holds
``0003_fleet``, ``0005_stale.py`` holds ``0004_stale`` and ``0006_gate.py`` holds ``0005_gate``.
"""

"""The command lines ``invardiff`` and ``invardiff-registry``: the top layer.

Imports go one way: engine (``invardiff``) <- registry (``registry``) <- fleet (``workers``)
<- commands (this package); tests/test_layout.py checks it.

- :mod:`.base`: what every command shares (output, errors and exit codes, secret masking,
  options and types, help format).
- :mod:`.registry_commands`: the registry's commands (schema, models, plans, maintenance).
- :mod:`.fleet_commands`: ``calibrate`` and ``jobs`` (calibration on Ray).
- :mod:`.schedule_commands`: ``recalibrate`` (what is due).
- :mod:`.engine_commands`: ``invardiff`` (demo, calibrate, show) and its entry point.
- :mod:`.registry_app`: ``invardiff-registry``, assembled from the three modules above.
"""

"""Calibration report: validation samples (full compute above, cached below), a plan heatmap.

The PNGs are stored with the job (``jobs/<job_key>/report/``) so that asking for the report
of a job that already succeeded needs no recomputation; ``--report DIR`` copies them and
writes the command's JSON beside them.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from registry.errors import NotFound, Unreachable

VALIDATION_PNG = "validation.png"
PLAN_PNG = "plan.png"
RESULT_JSON = "result.json"
_SCALE = 4
_GAP = 2


def report_key(job_key: str, name: str) -> str:
    return f"jobs/{job_key}/report/{name}"


def validation_grid(full: np.ndarray, cached: np.ndarray, columns: int = 16) -> np.ndarray:
    """uint8 image: the first ``columns`` full-compute samples above their cached twins."""
    rows = [full[:columns], cached[:columns]]
    tiles = [np.concatenate(list(row), axis=1) for row in rows]
    gap = np.ones((_GAP, tiles[0].shape[1], tiles[0].shape[2]), dtype=np.float32)
    grid = np.concatenate([tiles[0], gap, tiles[1]], axis=0)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    image = (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)
    return np.kron(image, np.ones((_SCALE, _SCALE) + (1,) * (image.ndim - 2), dtype=np.uint8))


def plan_heatmap(plan) -> np.ndarray:
    """RGB uint8: one panel per module kind (layers down, steps across), the step gate on top.

    Black = computed, light = reused; a reused whole step is orange in the gate row and tints
    its column in every panel.
    """
    cell = 6
    steps = plan.steps
    gate = np.asarray(plan.step_gate, dtype=bool)
    panels = [np.where(gate[None, :], 2, 0)]  # the gate row
    for kind in sorted(plan.modules):
        flags = np.asarray(plan.modules[kind], dtype=bool).T  # layers x steps
        panels.append(np.full((1, steps), 3))  # separator
        panels.append(np.where(gate[None, :], 2, flags.astype(int)))
    codes = np.concatenate(panels, axis=0)
    palette = np.array(
        [[20, 20, 20], [235, 235, 235], [245, 150, 40], [255, 255, 255]], dtype=np.uint8
    )
    return np.kron(palette[codes], np.ones((cell, cell, 1), dtype=np.uint8))


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def store_report(store, job_key: str, plan_bytes: bytes, validation: dict[str, Any] | None,
                 result: dict[str, Any]) -> None:  # fmt: skip
    """Write the job's PNGs to the store (write-once)."""
    from invardiff.plan import CachePlan

    images = {PLAN_PNG: _png(plan_heatmap(CachePlan.from_bytes(plan_bytes)))}
    if validation is not None:
        images[VALIDATION_PNG] = _png(validation_grid(validation["full"], validation["cached"]))
    for name, data in images.items():
        store.put_new(report_key(job_key, name), data, hashlib.sha256(data).hexdigest())


def copy_report(store, job_key: str, result: dict[str, Any], folder: Path) -> dict[str, str]:
    """Copy the job's stored PNGs into ``folder`` and write ``result.json``; return the paths."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Unreachable(f"cannot create report folder {folder}: {exc.strerror or exc}") from None
    paths = {}
    for name in (VALIDATION_PNG, PLAN_PNG):
        try:
            data = store.get(report_key(job_key, name))
        except NotFound:
            continue
        (folder / name).write_bytes(data)
        paths[name.split(".")[0]] = str(folder / name)
    paths["json"] = str(folder / RESULT_JSON)
    (folder / RESULT_JSON).write_text(
        json.dumps({**result, "report": paths}, indent=2, sort_keys=True, default=str) + "\n"
    )
    return paths

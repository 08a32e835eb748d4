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
    """RGB uint8: the step gate on top, then one panel per module kind (layers down, steps
    across), each labelled, and a legend. Dark = computed, light grey = module reused, orange =
    the whole step reused (the gate; held or extrapolated by the plan's step rule), which also
    tints its column in every panel.
    """
    from PIL import Image, ImageDraw

    cell, margin, gap, line = 6, 96, 4, 14
    gate = np.asarray(plan.step_gate, dtype=bool)
    panels = [("step gate", np.where(gate[None, :], 2, 0).repeat(2, axis=0))]  # label height
    for kind in sorted(plan.modules):
        flags = np.asarray(plan.modules[kind], dtype=bool).T.astype(int)  # layers x steps
        panels.append((f"{kind} ({flags.shape[0]})", np.where(gate[None, :], 2, flags)))
    palette = np.array([[25, 25, 25], [215, 215, 215], [245, 150, 40]], dtype=np.uint8)
    step_rule = "extrapolated" if plan.step_reuse == "linear" else "held"
    legend = [(0, "computed"), (1, "module reused"), (2, f"whole step {step_rule}")]
    height = sum(p.shape[0] * cell + gap for _, p in panels) + line * (1 + len(legend))
    width = max(margin + plan.steps * cell + 4, 220)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    top = 0
    for label, codes in panels:
        block = np.kron(palette[codes], np.ones((cell, cell, 1), dtype=np.uint8))
        canvas.paste(Image.fromarray(block), (margin, top))
        draw.text((2, top), label, fill="black")
        top += block.shape[0] + gap
    draw.text((margin, top), f"steps 0..{plan.steps - 1} ->", fill="black")
    for code, label in legend:
        top += line
        draw.rectangle((2, top + 2, 11, top + 11), fill=tuple(palette[code]), outline="black")
        draw.text((16, top), label, fill="black")
    return np.asarray(canvas)


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

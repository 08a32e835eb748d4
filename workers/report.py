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


LINE = 14  # pixels per line of text (PIL's default font)
LABEL_WIDTH = 64


def _fixed(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def figures(result: dict[str, Any]) -> list[str]:
    """The header lines of a report image: model, version, plan, measured figures."""
    metrics = result.get("metrics") or {}
    lines = [
        f"{result.get('model')} v{result.get('version')}  plan {str(result.get('sha256'))[:12]}"
    ]
    ideal = _fixed(metrics.get("ideal_speedup"), 2)
    if "measured_speedup" not in metrics:
        return [*lines, f"ideal speed-up {ideal}x"]
    psnr = metrics.get("psnr_db")
    held = metrics.get("validation") or {}
    measured = f"speed-up {_fixed(metrics['measured_speedup'], 2)}x measured ({ideal}x ideal)"
    psnr_text = "inf" if psnr is None else _fixed(psnr, 1)
    return [
        *lines,
        f"{measured}, PSNR {psnr_text} dB, SSIM {_fixed(metrics.get('ssim'), 4)}",
        f"{held.get('samples', '?')} held-out samples on {held.get('device', '?')}",
    ]


def with_header(
    image: np.ndarray, lines: list[str], labels: list[tuple[int, str]] = ()
) -> np.ndarray:
    """RGB ``image`` under a header of text ``lines``, with ``labels`` (``(row, text)``) in a
    left margin when given."""
    from PIL import Image, ImageDraw

    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    left = LABEL_WIDTH if labels else 0
    top = LINE * len(lines) + 4
    width = max(left + rgb.shape[1], 6 * max(len(line) for line in lines) + 8)
    canvas = Image.new("RGB", (width, top + rgb.shape[0]), "white")
    canvas.paste(Image.fromarray(rgb.astype(np.uint8)), (left, top))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 2 + i * LINE), line, fill="black")
    for row, text in labels:
        draw.text((4, top + row), text, fill="black")
    return np.asarray(canvas)


def validation_figure(full: np.ndarray, cached: np.ndarray, result: dict[str, Any]) -> np.ndarray:
    """The validation grid titled with the model, version and measured figures, its rows
    labelled (full compute above, the plan below)."""
    grid = validation_grid(full, cached)
    row = full.shape[1] * _SCALE
    lines = [
        "held-out samples: full compute (top) vs cached with the plan (bottom)",
        *figures(result),
    ]
    labels = [
        (row // 2 - LINE // 2, "full"),
        (row + _GAP * _SCALE + row // 2 - LINE // 2, "cached"),
    ]
    return with_header(grid, lines, labels)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def store_report(store, job_key: str, plan_bytes: bytes, validation: dict[str, Any] | None,
                 result: dict[str, Any]) -> None:  # fmt: skip
    """Write the job's PNGs to the store (write-once)."""
    from invardiff.plan import CachePlan

    plan = with_header(
        plan_heatmap(CachePlan.from_bytes(plan_bytes)), ["cache plan", *figures(result)]
    )
    images = {PLAN_PNG: _png(plan)}
    if validation is not None:
        images[VALIDATION_PNG] = _png(
            validation_figure(validation["full"], validation["cached"], result)
        )
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

"""An independent, in-memory restatement of the reference implementation's calibrator.

Written from the reference's structure (all features of a trajectory held in memory, rates
from (x_prev, x, x_post) triples, DiT-style prev/curr bookkeeping in phase 2) to check the
streaming calibrator flag for flag. Test code only.
"""

from __future__ import annotations

import torch


def rate(x_prev, x, x_post):
    return (x_post - x + 1e-8).norm(p=1) / (x - x_prev + 1e-8).norm(p=1)


def phase1(features: list[torch.Tensor], aligned: bool = False) -> torch.Tensor:
    steps = len(features)
    out = torch.ones(steps)
    for k in range(2, steps):
        out[k if aligned else k - 1] = rate(features[k - 2], features[k - 1], features[k])
    return out


def phase2(features: list[torch.Tensor], provisional: torch.Tensor, aligned: bool = False) -> torch.Tensor:
    """Reference: score k-1, driven by provisional[k-1], one advance when a run opens.
    Aligned (an option beyond the reference): score k, driven by provisional[k], frozen from
    the first flagged step."""
    steps = len(features)
    out = torch.ones(steps)
    prev, curr, state = features[0], features[1], False
    for k in range(2, steps):
        at = k if aligned else k - 1
        out[at] = (features[k] - curr + 1e-8).norm(p=1) / (curr - prev + 1e-8).norm(p=1)
        if not provisional[at]:
            prev, curr, state = curr, features[k], False
        elif not state:
            if not aligned:
                prev, curr = curr, features[k]
            state = True
    return out


def book(avg: torch.Tensor, q: float, aligned: bool = False) -> torch.Tensor:
    rows = slice(2, None) if aligned else slice(1, -1)
    flags = torch.zeros_like(avg, dtype=torch.bool)
    flags[rows] = avg[rows] < torch.quantile(avg[rows], q)
    return flags


def mask(flags: torch.Tensor, n: int) -> torch.Tensor:
    flags = flags.clone()
    flags[0:n] = False
    flags[-1] = False
    return flags


def cap(flags: torch.Tensor, limit: int | None, skipped: torch.Tensor | None = None) -> torch.Tensor:
    """Per column, no more than ``limit`` idle steps in a row (flagged, or a skipped step, whose
    flags cannot be cleared): an over-long run is cut at its latest clearable step."""
    flags = flags.clone()
    if limit is None:
        return flags
    columns = flags[:, None] if flags.ndim == 1 else flags
    steps = len(columns)
    forced = [bool(skipped[u]) if skipped is not None else False for u in range(steps)]
    for c in range(columns.shape[1]):
        t = 0
        while t < steps:
            end = t
            while end < steps and (columns[end, c] or forced[end]):
                end += 1
            if end - t > limit:
                cut = max(u for u in range(t, t + limit + 1) if not forced[u])
                columns[cut, c] = False
                t = cut + 1
            else:
                t = max(end, t + 1)
    return flags


def calibrate(trajectories, arch: str, nonskip: float, q_step: float, q: dict[str, float],
              flag_index: str = "reference", correct_flux_step_gate: bool = False,
              max_consecutive: int | None = None):  # fmt: skip
    """``trajectories``: per run, {key: [per-layer list of per-step features]} incl. 'hidden'.

    Returns (step book [T], {kind: book [T x L]}).
    """
    aligned = flag_index == "aligned"
    steps = len(trajectories[0]["hidden"][0])
    n = int(nonskip * steps)
    n = max(n, 1)
    kinds = list(q)

    def averaged(fn, key, drive=None):
        runs = []
        for traj in trajectories:
            layers = traj[key]
            cols = [fn(layers[l], aligned=aligned) if drive is None else fn(layers[l], drive[:, l], aligned=aligned)
                    for l in range(len(layers))]  # fmt: skip
            runs.append(torch.stack(cols, dim=1))
        return torch.stack(runs).mean(dim=0)

    step1 = mask(book(averaged(phase1, "hidden")[:, 0], q_step, aligned), n)
    module_mask = 1 if arch == "flux" else n
    c1 = {k: mask(book(averaged(phase1, k), q[k], aligned), module_mask) for k in kinds}
    if arch == "dit" or correct_flux_step_gate:
        step = book(averaged(phase2, "hidden", step1[:, None])[:, 0], q_step, aligned)
    else:
        step = step1
    step = mask(cap(step, max_consecutive), n)
    books = {k: mask(book(averaged(phase2, k, c1[k]), q[k], aligned), n) for k in kinds}
    for t in range(steps):
        if step[t]:
            for b in books.values():
                b[t, :] = True
                if t + 1 < steps:
                    b[t + 1, :] = False
    return step, {k: cap(b, max_consecutive, skipped=step) for k, b in books.items()}

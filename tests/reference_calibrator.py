"""An independent, in-memory restatement of the reference implementation's calibrator.

Written from the reference's structure (all features of a trajectory held in memory, rates
from (x_prev, x, x_post) triples, DiT-style prev/curr bookkeeping in phase 2) to check the
streaming calibrator flag for flag. Test code only.
"""

from __future__ import annotations

import torch


def rate(x_prev, x, x_post):
    return (x_post - x + 1e-8).norm(p=1) / (x - x_prev + 1e-8).norm(p=1)


def phase1(features: list[torch.Tensor]) -> torch.Tensor:
    steps = len(features)
    out = torch.ones(steps)
    for k in range(2, steps):
        out[k - 1] = rate(features[k - 2], features[k - 1], features[k])
    return out


def phase2(features: list[torch.Tensor], provisional: torch.Tensor) -> torch.Tensor:
    steps = len(features)
    out = torch.ones(steps)
    prev, curr, state = features[0], features[1], False
    for k in range(2, steps):
        out[k - 1] = (features[k] - curr + 1e-8).norm(p=1) / (curr - prev + 1e-8).norm(p=1)
        if not provisional[k - 1]:
            prev, curr, state = curr, features[k], False
        elif not state:
            prev, curr, state = curr, features[k], True
    return out


def book(avg: torch.Tensor, q: float) -> torch.Tensor:
    return avg < torch.quantile(avg[1:-1], q)


def mask(flags: torch.Tensor, n: int) -> torch.Tensor:
    flags = flags.clone()
    flags[0:n] = False
    flags[-1] = False
    return flags


def calibrate(trajectories, arch: str, nonskip: float, q_step: float, q: dict[str, float]):
    """``trajectories``: per run, {key: [per-layer list of per-step features]} incl. 'hidden'.

    Returns (step book [T], {kind: book [T x L]}).
    """
    steps = len(trajectories[0]["hidden"][0])
    n = int(nonskip * steps)
    if n < 1:
        n = 1
    kinds = list(q)

    def averaged(fn, key, drive=None):
        runs = []
        for traj in trajectories:
            layers = traj[key]
            cols = [fn(layers[l]) if drive is None else fn(layers[l], drive[:, l]) for l in range(len(layers))]
            runs.append(torch.stack(cols, dim=1))
        return torch.stack(runs).mean(dim=0)

    step1 = mask(book(averaged(phase1, "hidden")[:, 0], q_step), n)
    module_mask = 1 if arch == "flux" else n
    c1 = {k: mask(book(averaged(phase1, k), q[k]), module_mask) for k in kinds}
    if arch == "dit":
        step = mask(book(averaged(phase2, "hidden", step1[:, None])[:, 0], q_step), n)
    else:
        step = step1
    books = {k: mask(book(averaged(phase2, k, c1[k]), q[k]), n) for k in kinds}
    for t in range(steps):
        if step[t]:
            for b in books.values():
                b[t, :] = True
                if t + 1 < steps:
                    b[t + 1, :] = False
    return step, books

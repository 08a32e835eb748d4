"""The calibration math of ALGORITHM.md §2-§5 as pure functions on float32 tensors.

Streaming trackers turn one module's outputs, step by step, into change scores while holding
only one or two tensors; the remaining functions turn trajectory-averaged scores into flags.
Every detail follows the reference implementation (README, "Calibration, as implemented").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

EPS = 1e-8  # added to every element of a difference before the L1 norm (reference)
FLAG_INDEX_MODES = ("reference", "aligned")


def l1_change(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """``|current - previous + 1e-8|_1`` over the whole tensor, as a float32 scalar."""
    return (current.float() - previous.float() + EPS).norm(p=1)


def defined_rows(steps: int, flag_index: str) -> slice:
    """Steps whose score is defined: 1..T-2 (reference) or 2..T-1 (aligned)."""
    return slice(1, steps - 1) if flag_index == "reference" else slice(2, steps)


@dataclass
class ChangeTracker:
    """Phase 1 for one module: ``r[i] = D[i+1] / D[i]`` (reference) or ``D[i] / D[i-1]``.

    ``D[i] = |Z[i] - Z[i-1] + 1e-8|_1``; undefined entries stay 1.0. Holds Z[i-1] only.
    """

    steps: int
    flag_index: str = "reference"
    scores: torch.Tensor = field(init=False)
    _previous: torch.Tensor | None = field(default=None, init=False, repr=False)
    _last_change: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.scores = torch.ones(self.steps, dtype=torch.float32)

    def update(self, step: int, output: torch.Tensor) -> None:
        """Feed the module's output at ``step`` (steps arrive in order 0..T-1)."""
        if step > 0:
            change = l1_change(output, self._previous)
            if step > 1:
                at = step - 1 if self.flag_index == "reference" else step
                self.scores[at] = change / self._last_change
            self._last_change = change
        self._previous = output.detach()

    def release(self) -> None:
        self._previous = None


@dataclass
class CorrectionTracker:
    """Phase 2 for one module: the change since a reference frozen inside provisional runs.

    ``provisional[i]`` is the module's masked phase-1 flag for step i. Reference mode scores
    step k at index k-1, driven by ``provisional[k-1]``, and advances the reference once when
    a run opens (as the reference does); aligned mode scores step k at index k, driven by
    ``provisional[k]``, and freezes from the first reused step.
    """

    provisional: torch.Tensor
    flag_index: str = "reference"
    scores: torch.Tensor = field(init=False)
    _reference: torch.Tensor | None = field(default=None, init=False, repr=False)
    _reference_change: torch.Tensor | None = field(default=None, init=False, repr=False)
    _in_run: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.scores = torch.ones(len(self.provisional), dtype=torch.float32)

    def update(self, step: int, output: torch.Tensor) -> None:
        """Feed the module's output at ``step`` (steps arrive in order 0..T-1)."""
        output = output.detach()
        if step == 0:
            self._reference = output
            return
        change = l1_change(output, self._reference)
        if step == 1:
            self._advance(output, change)
            return
        at = step - 1 if self.flag_index == "reference" else step
        self.scores[at] = change / self._reference_change
        if not bool(self.provisional[at]):
            self._advance(output, change)
            self._in_run = False
        elif not self._in_run:
            if self.flag_index == "reference":
                self._advance(output, change)
            self._in_run = True

    def _advance(self, output: torch.Tensor, change: torch.Tensor) -> None:
        self._reference = output
        self._reference_change = change

    def release(self) -> None:
        self._reference = None


def mean_over_trajectories(per_trajectory: list[torch.Tensor]) -> torch.Tensor:
    """Arithmetic mean in float32 of equally shaped score arrays (in the given order)."""
    return torch.stack([s.float() for s in per_trajectory]).mean(dim=0)


def threshold(scores: torch.Tensor, q: float, flag_index: str = "reference") -> torch.Tensor:
    """Flags ``scores < quantile(defined rows, q)``; undefined rows are never flagged.

    All layers are pooled; the quantile interpolates linearly; ``q = 0`` flags nothing.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], got {q}")
    rows = defined_rows(scores.shape[0], flag_index)
    theta = torch.quantile(scores[rows].float().reshape(-1), q)
    flags = scores < theta
    keep = torch.zeros_like(flags)
    keep[rows] = True
    return flags & keep


def warmup_steps(nonskip: float, steps: int) -> int:
    """``max(1, int(nonskip * steps))``: the first steps that are never reused."""
    return max(1, int(nonskip * steps))


def mask_steps(flags: torch.Tensor, warmup: int) -> torch.Tensor:
    """Never reuse in the first ``warmup`` steps or at the last step."""
    flags = flags.clone()
    flags[:warmup] = False
    flags[-1] = False
    return flags


def cap_runs(flags: torch.Tensor, cap: int | None, skipped: torch.Tensor | None = None) -> torch.Tensor:
    """Clear flags so no column goes more than ``cap`` steps in a row without computing.

    ``None`` keeps all. ``skipped`` (``[T]``, module flags only) marks skipped steps: they
    count as reuse and cannot be cleared, so a run that a skipped step would take past the
    cap is broken at its last computed step instead.
    """
    if cap is None:
        return flags
    if cap < 1:
        raise ValueError(f"max_consecutive must be at least 1, got {cap}")
    flags = flags.clone()
    forced = torch.zeros(flags.shape[0], dtype=torch.bool) if skipped is None else skipped.bool()
    for column in flags.reshape(flags.shape[0], -1).T if flags.ndim == 1 else flags.T:
        run, last_clearable = 0, None
        for i in range(len(column)):
            if not (column[i] or forced[i]):
                run, last_clearable = 0, None
                continue
            run += 1
            if not forced[i]:
                last_clearable = i
            if run > cap:
                column[last_clearable] = False  # a skipped run alone never exceeds the (capped) gate
                run, last_clearable = i - last_clearable, None
    return flags


def recompute_after_skip(step_gate: torch.Tensor, modules: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A skipped step marks all its modules reused; the step after it recomputes every module.

    Applied in ascending step order like the reference, so inside a run of skipped steps the
    later "all reused" wins.
    """
    modules = {k: v.clone() for k, v in modules.items()}
    steps = step_gate.shape[0]
    for i in range(steps):
        if step_gate[i]:
            for flags in modules.values():
                flags[i] = True
                if i + 1 < steps:
                    flags[i + 1] = False
    return modules

"""Forward hooks that stream one calibration trajectory into per-module change scores.

Hooks read each module's raw output (before the adaLN gate and residual) and H (the output
of the last block), and feed them to one tracker per (module kind, layer); nothing else is
kept. The step index is the position of the called timestep in the trajectory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .architectures import MODULE_KINDS, Geometry, layer_lists
from .scores import ChangeTracker, CorrectionTracker
from .stepping import find_timestep, timestep_argument, timestep_value

if TYPE_CHECKING:
    from typing_extensions import Self

HIDDEN = "hidden"  # the score key of H, the step-gate signal


class TrajectoryRecorder:
    """Attach to a transformer for one trajectory; ``scores()`` afterwards.

    ``provisional`` None records phase 1; otherwise it maps each score key to the masked
    phase-1 flags ``[T x L]`` (``hidden``: ``[T x 1]``) that drive phase 2. A key missing
    from ``provisional`` is not tracked in phase 2.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        arch: str,
        steps: int,
        provisional: dict[str, torch.Tensor] | None = None,
        flag_index: str = "reference",
    ) -> None:
        self.transformer = transformer
        self.arch = arch
        self.steps = steps
        self.timesteps: list[float] = []
        self.geometry: Geometry | None = None
        self.trackers: dict[str, list] = {}
        for kind in MODULE_KINDS[arch]:
            count = len(getattr(transformer, kind.layers))
            self.trackers[kind.name] = [self._tracker(kind.name, l, provisional, flag_index) for l in range(count)]
        self.trackers[HIDDEN] = [self._tracker(HIDDEN, 0, provisional, flag_index)]
        self._handles: list = []
        self._position = timestep_argument(transformer.forward)

    def _tracker(self, key, layer, provisional, flag_index):
        if provisional is None:
            return ChangeTracker(self.steps, flag_index)
        if key not in provisional:
            return None
        return CorrectionTracker(provisional[key][:, layer], flag_index)

    # ---- hooks -------------------------------------------------------------------------
    def __enter__(self) -> Self:
        t = self.transformer
        self._handles.append(t.register_forward_pre_hook(self._on_call, with_kwargs=True))
        for kind in MODULE_KINDS[self.arch]:
            if kind.name == "context_attn":
                continue
            for layer, block in enumerate(getattr(t, kind.layers)):
                if kind.name == "attn" and self.arch == "flux":
                    module, pick = block.attn, self._joint
                elif kind.name == "single_mlp":
                    module, pick = block.act_mlp, self._single
                else:
                    module, pick = getattr(block, kind.attribute), self._single
                self._handles.append(module.register_forward_hook(pick(kind.name, layer)))
        last = getattr(t, layer_lists(self.arch)[-1])[-1]
        self._handles.append(last.register_forward_hook(self._on_hidden))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for trackers in self.trackers.values():
            for tracker in trackers:
                if tracker is not None:
                    tracker.release()

    def _on_call(self, module, args, kwargs):
        value, _ = timestep_value(find_timestep(self._position, args, kwargs))
        if self.timesteps and value == self.timesteps[-1]:
            raise RuntimeError(
                "the transformer was called twice at one timestep; calibrate with one call per step "
                "(batch the classifier-free guidance, or calibrate without it)"
            )
        if len(self.timesteps) >= self.steps:
            raise RuntimeError(f"more than {self.steps} transformer calls in one calibration trajectory")
        self.timesteps.append(value)

    @property
    def step(self) -> int:
        return len(self.timesteps) - 1

    def _feed(self, key: str, layer: int, output: torch.Tensor) -> None:
        tracker = self.trackers[key][layer]
        if tracker is not None:
            tracker.update(self.step, output)

    def _single(self, key: str, layer: int):
        def hook(module, args, output):
            self._feed(key, layer, output)

        return hook

    def _joint(self, key: str, layer: int):
        def hook(module, args, output):
            self._feed("attn", layer, output[0])
            self._feed("context_attn", layer, output[1])

        return hook

    def _on_hidden(self, module, args, output):
        hidden = output if self.arch == "dit" else output[1]
        if self.geometry is None:
            self.geometry = _geometry(self.arch, hidden, output)
        self._feed(HIDDEN, 0, hidden)

    # ---- results -----------------------------------------------------------------------
    def scores(self) -> dict[str, torch.Tensor]:
        """Per score key, the ``[T x L]`` scores of this trajectory (``hidden``: ``[T x 1]``)."""
        if len(self.timesteps) != self.steps:
            raise RuntimeError(f"trajectory made {len(self.timesteps)} transformer calls, expected {self.steps}")
        return {
            key: torch.stack([t.scores for t in trackers], dim=1)
            for key, trackers in self.trackers.items()
            if trackers[0] is not None
        }


def _geometry(arch: str, hidden: torch.Tensor, output) -> Geometry:
    dim = int(hidden.shape[-1])
    if arch == "dit":
        return Geometry(dim=dim, tokens=int(hidden.shape[1]))
    return Geometry(dim=dim, tokens=int(hidden.shape[1]), context_tokens=int(output[0].shape[1]))

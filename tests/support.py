"""Test support: reference plan files and an independent module-call counter."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

OFFICIAL_PLANS = Path(__file__).resolve().parents[1] / "reference" / "official-plans"
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def official_plan_files(prefix: str = "") -> list[Path]:
    files = sorted(OFFICIAL_PLANS.glob(f"{prefix}*.json"))
    assert files, f"no reference plans under {OFFICIAL_PLANS}"
    return files


def probe_weights(transformer: torch.nn.Module, arch: str) -> dict[tuple[str, int], torch.Tensor]:
    """One weight per (module kind, layer) that is used exactly once per real computation."""
    probes: dict[tuple[str, int], torch.Tensor] = {}
    if arch == "dit":
        for l, block in enumerate(transformer.transformer_blocks):
            probes[("attn", l)] = block.attn1.to_q.weight
            probes[("mlp", l)] = block.ff.net[0].proj.weight
        return probes
    for l, block in enumerate(transformer.transformer_blocks):
        probes[("attn", l)] = block.attn.to_q.weight
        probes[("context_attn", l)] = block.attn.add_q_proj.weight
        probes[("ff", l)] = block.ff.net[0].proj.weight
        probes[("context_ff", l)] = block.ff_context.net[0].proj.weight
    for l, block in enumerate(transformer.single_transformer_blocks):
        probes[("single_attn", l)] = block.attn.to_q.weight
        probes[("single_mlp", l)] = block.proj_mlp.weight
    return probes


class _MatmulCounter(TorchDispatchMode):
    def __init__(self, probes):
        super().__init__()
        self.by_storage = {w.untyped_storage().data_ptr(): key for key, w in probes.items()}
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            for a in args:
                if isinstance(a, torch.Tensor):
                    key = self.by_storage.get(a.untyped_storage().data_ptr())
                    if key is not None:
                        self.counts[key] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_module_calls(transformer: torch.nn.Module, arch: str):
    """Count real computations per (kind, layer) from the matmuls that touch its weights.

    Independent of the runtime's bookkeeping: it watches the ATen ops that actually run.
    """
    counter = _MatmulCounter(probe_weights(transformer, arch))
    with counter:
        yield counter.counts

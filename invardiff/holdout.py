"""Held-out calls of a budget search: three disjoint seed sets and the per-sample measure.

A budget calibration uses three sets of calls whose seeds are pairwise disjoint: calibration
(phase-1 statistics), selection (ranks the candidates) and certification (the returned plan's
figures). :func:`held_out_sets` derives the defaults (the calibration calls with fresh seeds,
past every seed already used, whatever those are) and checks every seed of every set.
``holdout_measure(pipeline, calls)`` runs every call once at full compute, then returns
``measure(plans, done)``: per plan, the PSNR (dB, :func:`invardiff.metrics.psnr`) of every
sample (each image of a call's batch) against those. Calls that differ only in seed and in
their single class label or prompt run as one batched pipeline call (:func:`merge_calls`,
:func:`batches`), with one generator per call, references batched the same way.
"""

from __future__ import annotations

import inspect
import json
from itertools import combinations
from typing import Any

import numpy as np
import torch

from .certify import Done, Measure
from .metrics import psnr
from .plan import CachePlan

Calls = list[dict[str, Any]]
CONDITIONS = ("class_labels", "prompt")  # the keys a merged call concatenates
MAX_BATCH = 8  # calls per batched pipeline call, by default
MAX_BATCH_PIXELS = 8 * 512 * 512  # and output pixels per batch, by default (FLUX.1-dev 1024 px: 2 calls)


def fresh_calls(calls: Calls, used: Calls) -> Calls:
    """``calls`` with fresh seeds: consecutive from one past the largest seed in ``used``."""
    start = max(int(call["seed"]) for call in used) + 1
    return [{**call, "seed": start + i} for i, call in enumerate(calls)]


def check_disjoint(**sets: Calls) -> None:
    """Refuse an empty set, a call without a seed, and any seed two of the named sets share."""
    for name, calls in sets.items():
        if not calls:
            raise ValueError(f"the {name} set needs at least one call")
        if any("seed" not in call for call in calls):
            raise ValueError(f"every {name} call needs a 'seed'")
    for (first, a), (second, b) in combinations(sets.items(), 2):
        shared = {int(c["seed"]) for c in a} & {int(c["seed"]) for c in b}
        if shared:
            raise ValueError(f"{second} calls reuse {first} seed(s) {sorted(shared)[:8]}: each set needs fresh seeds")


def call_samples(call: dict[str, Any]) -> int:
    """The images one call produces: its conditions (class labels or prompts) times
    ``num_images_per_prompt``."""
    condition = call.get("prompt", call.get("class_labels"))
    conditions = 1 if condition is None or isinstance(condition, str) else len(np.atleast_1d(condition))
    return conditions * int(call.get("num_images_per_prompt") or 1)


def held_out_sets(
    calls: Calls, selection: Calls | None = None, certification: Calls | None = None, min_samples: int = 0
) -> tuple[Calls, Calls]:
    """The selection and certification calls of a calibration on ``calls`` (defaults: ``calls``
    with fresh seeds each; the certification's repeated, each time with fresh seeds, until it
    has ``min_samples`` samples), checked pairwise disjoint with the calibration calls; a given
    certification set with fewer than ``min_samples`` samples is refused."""
    check_disjoint(calibration=calls)
    selection = fresh_calls(calls, calls) if selection is None else selection
    if certification is None:
        per_round = sum(call_samples(call) for call in calls)
        rounds = max(1, -(-min_samples // max(per_round, 1)))
        certification = fresh_calls(calls * rounds, [*calls, *selection])
    check_disjoint(calibration=calls, selection=selection, certification=certification)
    given = sum(call_samples(call) for call in certification)
    if given < min_samples:
        raise ValueError(f"the certification set gives {given} sample(s): a min_psnr_p5 promise needs at least "
                         f"{min_samples} (pass more certification calls, or none for the default)")  # fmt: skip
    return selection, certification


def _condition(call: dict[str, Any]) -> Any:
    """The call's single condition (a class label or a prompt string), or None when it has
    several (a batch of its own, drawn from one generator), draws several images or carries
    other per-sample inputs (``prompt_2``, embeddings: a pipeline would not batch them along)."""
    if int(call.get("num_images_per_prompt") or 1) != 1 or any(k.startswith("prompt_") or k.endswith("embeds")
                                                               for k in call):  # fmt: skip
        return None
    if isinstance(call.get("prompt"), str):
        return call["prompt"]
    labels = call.get("class_labels")
    if "prompt" not in call and labels is not None and len(np.atleast_1d(labels)) == 1:
        return int(np.atleast_1d(labels)[0])
    return None


def _shared(call: dict[str, Any]) -> str:
    """What calls must share to be merged: every argument but the seed and the condition."""
    rest = {k: v for k, v in call.items() if k not in ("seed", *CONDITIONS)}
    return json.dumps({"condition": "prompt" if "prompt" in call else "class_labels", **rest}, sort_keys=True,
                      default=repr)  # fmt: skip


def merge_calls(calls: Calls) -> tuple[dict[str, Any], list[int]]:
    """One pipeline call for several single-condition calls (one class label or one prompt
    each, the same other arguments) and their seeds, in order: sample i of the merged call is
    call i's sample when generated with ``[torch.Generator().manual_seed(s) for s in seeds]``."""
    if any(_condition(call) is None for call in calls) or len({_shared(call) for call in calls}) != 1:
        raise ValueError("only calls with one class label or prompt each and the same other arguments merge")
    merged = {k: v for k, v in calls[0].items() if k not in ("seed", *CONDITIONS)}
    key = "prompt" if "prompt" in calls[0] else "class_labels"
    merged[key] = [_condition(call) for call in calls]
    return merged, [int(call["seed"]) for call in calls]


def batches(calls: Calls, max_batch: int) -> list[list[int]]:
    """Indices of ``calls`` grouped into pipeline calls: mergeable calls (:func:`merge_calls`)
    in order of first appearance, at most ``max_batch`` per group; every other call alone."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    groups: dict[str, list[list[int]]] = {}
    alone: list[list[int]] = []
    for i, call in enumerate(calls):
        if _condition(call) is None:
            alone.append([i])
            continue
        chunks = groups.setdefault(_shared(call), [[]])
        if len(chunks[-1]) == max_batch:
            chunks.append([])
        chunks[-1].append(i)
    return sorted([chunk for chunks in groups.values() for chunk in chunks] + alone, key=lambda g: g[0])


def default_batch(pixels: int) -> int:
    """Calls per batch for images of ``pixels`` pixels: :data:`MAX_BATCH`, fewer where the batch
    would exceed :data:`MAX_BATCH_PIXELS` (at least 1)."""
    return max(1, min(MAX_BATCH, MAX_BATCH_PIXELS // max(pixels, 1)))


def holdout_measure(pipeline, calls: Calls, max_batch: int | None = None) -> Measure:
    """``measure(plans, done) -> [per-sample PSNR dB]`` on ``calls`` (each with a ``seed``),
    samples in the order of ``calls`` (and of each call's images).

    Outputs are images in [0, 1] (``output_type="np"``, data range 1; one sample per image)
    when the pipeline takes ``output_type``, else its raw output (one sample per call, data
    range: the reference's peak to peak; never batched). ``max_batch`` caps the calls merged
    into one pipeline call (1: one call at a time); by default up to :data:`MAX_BATCH` calls
    and :data:`MAX_BATCH_PIXELS` output pixels (the first reference's image size decides).
    """
    from .runtime import cached

    images = "output_type" in inspect.signature(pipeline.__call__).parameters

    def run(group: Calls) -> list[np.ndarray]:  # one pipeline call; each call's output
        if len(group) == 1:
            kwargs = {k: v for k, v in group[0].items() if k != "seed"}
            generator = torch.Generator().manual_seed(int(group[0]["seed"]))
        else:
            kwargs, seeds = merge_calls(group)
            generator = [torch.Generator().manual_seed(seed) for seed in seeds]
        if images:
            kwargs.setdefault("output_type", "np")
        with torch.no_grad():
            result = pipeline(**kwargs, generator=generator)
        result = getattr(result, "images", result)
        result = result[0] if isinstance(result, tuple) else result
        result = result.float().cpu().numpy() if isinstance(result, torch.Tensor) else np.asarray(result)
        if not images:
            return [result.reshape(1, -1, 1, 1)]  # raw: the whole output is one sample
        return list(np.split(result, len(group))) if len(group) > 1 else [result]

    probe = None
    if images and max_batch is None:  # the first reference alone gives the image size
        probe = run(calls[:1])[0]
        max_batch = default_batch(int(np.prod(probe.shape[1:3])))
    layout = batches(calls, max_batch or 1) if images else [[i] for i in range(len(calls))]

    def outputs() -> list[np.ndarray]:
        per_call: list[np.ndarray | None] = [None] * len(calls)
        for group in layout:
            for i, output in zip(group, run([calls[i] for i in group])):
                per_call[i] = output
        return per_call  # type: ignore[return-value]

    references = [probe] if layout == [[0]] and probe is not None else outputs()
    ranges = [1.0 if images else float(np.ptp(r)) or 1.0 for r in references]

    def measure(plans: list[CachePlan], done: Done) -> list[list[float]]:
        values = []
        for plan in plans:
            with cached(pipeline, plan):
                results = outputs()
            values.append([float(v) for o, r, d in zip(results, references, ranges) for v in psnr(o, r, d, "none")])
            done()
        return values

    return measure

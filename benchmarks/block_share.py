"""Share of a denoising step's wall time spent in the transformer blocks, for both digits models.

    python benchmarks/block_share.py [--batch 32] [--steps 10] [--repeats 3] [--threads 2]

Runs each built-in pipeline end to end (uncached) and times every transformer block with
forward pre/post hooks. The rest of a step (embeddings, final layers, scheduler, pipeline
Python) is what a cache plan cannot skip, so it caps every caching speed-up at
``1 / (1 - share)``. Prints one row per model and guidance scale (guidance > 1 doubles the
transformer batch); the fastest of ``--repeats`` runs counts.
"""

from __future__ import annotations

import argparse
import time

import torch

from invardiff.models import BUILTIN_MODELS, load_builtin


def _blocks(transformer) -> list[torch.nn.Module]:
    return list(transformer.transformer_blocks) + list(
        getattr(transformer, "single_transformer_blocks", [])
    )


def block_share(pipe, batch: int, steps: int, guidance: float, repeats: int) -> tuple[float, float]:
    """(block share, ms per step) of the fastest of ``repeats`` generations."""
    spent, started = [0.0], {}

    def pre(module, args):
        started[module] = time.perf_counter()

    def post(module, args, output):
        spent[0] += time.perf_counter() - started[module]

    blocks = _blocks(pipe.transformer)
    handles = [b.register_forward_pre_hook(pre) for b in blocks]
    handles += [b.register_forward_hook(post) for b in blocks]
    labels = [i % 10 for i in range(batch)]
    pipe.set_progress_bar_config(disable=True)

    def generate(num_steps: int) -> float:
        start = time.perf_counter()
        pipe(
            class_labels=labels,
            num_inference_steps=num_steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
        return time.perf_counter() - start

    try:
        generate(2)  # warm-up
        runs = []
        for _ in range(repeats):
            spent[0] = 0.0
            wall = generate(steps)
            runs.append((spent[0] / wall, 1000 * wall / steps))
    finally:
        for handle in handles:
            handle.remove()
    return min(runs, key=lambda run: run[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, {args.steps} steps, {torch.get_num_threads()} threads")
    print(f"{'model':<12} {'guidance':>8} {'blocks':>7} {'share':>6} {'ms/step':>8}")
    for name in BUILTIN_MODELS:
        pipe = load_builtin(name)
        count = len(_blocks(pipe.transformer))
        for guidance in args.guidance:
            share, ms = block_share(pipe, args.batch, args.steps, guidance, args.repeats)
            print(f"{name:<12} {guidance:>8.1f} {count:>7} {share:>6.3f} {ms:>8.1f}")


if __name__ == "__main__":
    main()

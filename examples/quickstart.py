"""Quick start, after the main job (scripts/demo): fetch the plan it published, sample the
built-in model with and without it, print the speed-up and the PSNR of cached against full.

    python examples/quickstart.py [digits-flux|digits-dit]

The plan comes from the registry under $INVARDIFF_HOME (default ~/.invardiff), where
scripts/demo published it; the fetched file is cached under $INVARDIFF_HOME/cache.
"""

import statistics
import sys
import time

import torch

import invardiff
import registry
from invardiff.metrics import psnr
from invardiff.models import load_builtin

model = sys.argv[1] if len(sys.argv) > 1 else "digits-flux"
plan = registry.fetch(model, 16)  # the latest plan for this model at 16x16
print(plan, plan.summary())

pipe = load_builtin(model)
pipe.set_progress_bar_config(disable=True)


def sample():
    generator = torch.Generator().manual_seed(0)
    return pipe(class_labels=list(range(10)), num_inference_steps=plan.steps,
                guidance_scale=plan.target.guidance, generator=generator, output_type="np").images


sample()  # warm-up
full_s, cached_s = [], []
for _ in range(3):  # interleaved, so machine noise hits both alike
    start = time.perf_counter()
    full = sample()
    middle = time.perf_counter()
    with invardiff.cached(pipe, plan):
        fast = sample()
    full_s.append(middle - start)
    cached_s.append(time.perf_counter() - middle)
speedup = statistics.median(full_s) / statistics.median(cached_s)
print(f"{model}: speed-up {speedup:.2f}x, PSNR {psnr(fast, full):.1f} dB (cached vs full, 10 digits)")

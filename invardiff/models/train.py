"""Reproducible training of the built-in digits models and the metrics classifier.

    python -m invardiff.models.train {digits-dit,digits-flux,classifier,all} [--out DIR]

Fixed seeds and fixed step counts; CPU, ``--threads`` (default 2) torch threads. Writes
``<name>.safetensors`` + ``<name>.json`` to ``--out`` (default: the package's weights folder),
prints progress, then reloads the written weights and prints their quality (classifier accuracy
and Frechet distance on :func:`invardiff.models.digits.quality_labels`). Needs scikit-learn.
Train the classifier first (``all`` does): the quality figures use ``--out``'s
``digits-classifier.safetensors`` if there is one, else the committed one.

Recipe (both diffusion models, 1500 steps each): batch 128, AdamW lr 1e-3 (no weight decay)
with 200 linear warm-up steps then constant, gradient clipping at 1.0, EMA 0.999 (the EMA
weights are saved), label dropout 0.1 to the null class for classifier-free guidance. With a
constant rate the EMA after N steps does not depend on the planned total, so checkpoints of a
longer run equal shorter runs. Bitwise reproduction needs the same CPU kind and thread count
(the committed weights used ``--threads 1``); see docs/models.md.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from ..metrics import CLASSIFIER_PATH, DigitsClassifier, accuracy, load_classifier, load_digits_16
from . import digits

CLASSIFIER_EPOCHS = 30


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings of one diffusion model."""

    steps: int
    batch_size: int = 128
    lr: float = 5e-4
    warmup: int = 200
    grad_clip: float = 1.0
    ema: float = 0.999
    label_dropout: float = 0.1
    seed: int = 0


DIT_RECIPE = Recipe(steps=1500, lr=1e-3)
FLUX_RECIPE = Recipe(steps=1500, lr=1e-3)
# Min-SNR-gamma loss weighting of the epsilon objective (Hang et al. 2023): w = min(SNR, 5) / SNR.
DIT_MIN_SNR_GAMMA = 5.0


def _train_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Training digits as (N, 1, 16, 16) in [-1, 1] and labels."""
    images, labels = load_digits_16("train")
    x = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
    return x.contiguous(), torch.from_numpy(labels)


def _fit(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Generator], torch.Tensor],
    recipe: Recipe,
    log: Callable[[str], None],
    checkpoint: Callable[[int, torch.nn.Module], None] | None = None,
    checkpoint_every: int = 0,
) -> torch.nn.Module:
    """Optimise ``model`` for ``recipe.steps`` steps; return its EMA copy.

    ``loss_fn`` draws its batch, noise and times from the generator it is given; ``checkpoint``
    (if given) is called with the step and the EMA model every ``checkpoint_every`` steps.
    """
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / recipe.warmup))
    ema = copy.deepcopy(model).requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    start, running = time.perf_counter(), 0.0
    for step in range(1, recipe.steps + 1):
        loss = loss_fn(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        warmup.step()
        decay = min(recipe.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        running += loss.item()
        if step % 100 == 0 or step == recipe.steps:
            elapsed = time.perf_counter() - start
            log(f"step {step}/{recipe.steps} loss {running / 100:.4f} {step / elapsed:.2f} it/s")
            running = 0.0
        if checkpoint and checkpoint_every and step % checkpoint_every == 0:
            checkpoint(step, ema)
    return ema


def _labels_with_dropout(y: torch.Tensor, p: float, null: int, gen: torch.Generator):
    drop = torch.rand(y.shape, generator=gen) < p
    return torch.where(drop, torch.full_like(y, null), y)


def train_dit(
    recipe: Recipe = DIT_RECIPE,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[int, torch.nn.Module], None] | None = None,
    checkpoint_every: int = 0,
) -> digits.DiTPipeline:
    """``digits-dit``: DDPM epsilon objective on the scheduler's betas, min-SNR weighted.

    The transformer stays in eval mode while training: its dropout is 0, and train mode would
    make each block's own label embedding drop labels independently; labels are dropped here
    instead, to the null class 1000 in every block at once.
    """
    pipe = digits.build_dit(seed=recipe.seed)
    model = pipe.transformer
    x, y = _train_tensors()
    alphas = pipe.scheduler.alphas_cumprod.float()
    steps = pipe.scheduler.config.num_train_timesteps

    def loss_fn(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(x), (recipe.batch_size,), generator=gen)
        x0 = x[idx]
        labels = _labels_with_dropout(y[idx], recipe.label_dropout, digits.DIT_NULL_CLASS, gen)
        t = torch.randint(steps, (recipe.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = model(xt, timestep=t, class_labels=labels).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = snr.clamp(max=DIT_MIN_SNR_GAMMA) / snr
        return (weight * ((pred - noise) ** 2).mean((1, 2, 3))).mean()

    pipe.transformer = _fit(model, loss_fn, recipe, log, checkpoint, checkpoint_every).eval()
    return pipe


def train_flux(
    recipe: Recipe = FLUX_RECIPE,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[int, torch.nn.Module], None] | None = None,
    checkpoint_every: int = 0,
) -> digits.DigitsFluxPipeline:
    """``digits-flux``: rectified flow, logit-normal times, velocity target noise - data."""
    pipe = digits.build_flux(seed=recipe.seed)
    model = pipe.transformer
    x, y = _train_tensors()
    tokens = digits.pack(x)
    img_ids = digits.image_ids(digits.IMAGE_SIZE, digits.IMAGE_SIZE)
    txt_ids = torch.zeros(digits.FLUX_CONTEXT_TOKENS, 3)

    def loss_fn(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(x), (recipe.batch_size,), generator=gen)
        x0 = tokens[idx]
        labels = _labels_with_dropout(y[idx], recipe.label_dropout, digits.FLUX_NULL_CLASS, gen)
        context, pooled = pipe.class_embeddings(labels)
        t = torch.sigmoid(torch.randn(recipe.batch_size, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
        pred = digits.flux_velocity(model, xt, t, context, pooled, txt_ids, img_ids)
        return F.mse_loss(pred, noise - x0)

    pipe.transformer = _fit(model, loss_fn, recipe, log, checkpoint, checkpoint_every).eval()
    return pipe


def train_classifier(
    epochs: int = CLASSIFIER_EPOCHS, seed: int = 0, log: Callable[[str], None] = print
) -> DigitsClassifier:
    """The metrics classifier: Adam 1e-3, batch 64, ``epochs`` passes over the training split."""
    images, labels = load_digits_16("train")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if (epoch + 1) % 10 == 0:
            log(f"classifier epoch {epoch + 1}/{epochs} loss {loss.item():.4f}")
    return model.eval()


def _report(name: str, pipe, classifier: DigitsClassifier, log: Callable[[str], None]) -> None:
    for g in (1.0, digits.QUALITY_GUIDANCE[name], 1.5):
        start = time.perf_counter()
        q = digits.quality(pipe, guidance_scale=g, classifier=classifier)
        log(
            f"  guidance {g}: accuracy {q['accuracy']:.3f} frechet {q['frechet']:.2f} "
            f"({time.perf_counter() - start:.0f} s)"
        )


def run(
    name: str, out: Path, log: Callable[[str], None] = print, grids: Path | None = None
) -> None:
    """Train ``name`` with its fixed recipe, write its weights to ``out``, log its quality.

    With ``grids``, also write ``<grids>/<name>.png`` (see :func:`digits.save_grid`).
    """
    start = time.perf_counter()
    classifier_path = out / CLASSIFIER_PATH.name
    if name == "classifier":
        model = train_classifier(log=log)
        images, labels = load_digits_16("test")
        acc = accuracy(images, labels, model)
        model.save(
            classifier_path,
            {"epochs": CLASSIFIER_EPOCHS, "seed": 0, "heldout_accuracy": round(acc, 4)},
        )
        log(f"classifier: held-out accuracy {acc:.4f}, {time.perf_counter() - start:.0f} s")
        return
    recipe = {"digits-dit": DIT_RECIPE, "digits-flux": FLUX_RECIPE}[name]
    trainer = {"digits-dit": train_dit, "digits-flux": train_flux}[name]
    pipe = trainer(recipe, log)
    minutes = (time.perf_counter() - start) / 60
    record = dict(asdict(recipe), train_minutes=round(minutes, 1), threads=torch.get_num_threads())
    digits.save_weights(pipe, name, record, out)
    log(f"{name}: trained {recipe.steps} steps in {minutes:.1f} min; quality of saved weights:")
    classifier = load_classifier(classifier_path if classifier_path.exists() else CLASSIFIER_PATH)
    pipe = digits.load_pipeline(name, out)
    _report(name, pipe, classifier, log)
    if grids is not None:
        digits.save_grid(pipe, grids / f"{name}.png", digits.QUALITY_GUIDANCE[name])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m invardiff.models.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=["digits-dit", "digits-flux", "classifier", "all"])
    parser.add_argument("--out", type=Path, default=digits.WEIGHTS_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grids", type=Path, help="also write <name>.png sample grids here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = ["classifier", "digits-flux", "digits-dit"] if args.name == "all" else [args.name]
    for name in names:
        run(name, args.out, log=lambda msg: print(msg, flush=True), grids=args.grids)


if __name__ == "__main__":
    main()

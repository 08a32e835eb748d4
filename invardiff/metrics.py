"""Image quality metrics: paired fidelity (PSNR, SSIM) and digits quality (accuracy, Frechet distance).

Images are numpy arrays in [0, 1], shaped (N, H, W, C) or (H, W, C), as pipelines return them
with ``output_type="np"``.

Digits metrics use a small CNN classifier trained on scikit-learn's ``load_digits`` (weights
committed as ``invardiff/models/weights/digits-classifier.safetensors``). Its 64-d penultimate
features give a Frechet distance (like FID) against the held-out digits. The digits data need
scikit-learn (the ``train`` extra); it is imported only when the data are needed.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

CLASSIFIER_PATH = Path(__file__).parent / "models" / "weights" / "digits-classifier.safetensors"
DIGITS_SIZE = 16
SPLIT_SEED = 0
TEST_FRACTION = 0.3

# SSIM constants (Wang et al. 2004): Gaussian window sigma 1.5, 11 taps; K1 0.01, K2 0.03.
SSIM_SIGMA = 1.5
SSIM_TAPS = 11
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _batched(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) or (H, W, C) images, got shape {images.shape}")
    return images


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _batched(a), _batched(b)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, reduction: str = "mean"):
    """Peak signal-to-noise ratio in dB per image pair (``inf`` where identical).

    ``reduction="mean"`` averages over the pairs (a float), ``"none"`` returns one value per pair.
    """
    a, b = _pair(a, b)
    mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(data_range**2 / mse)
    return _reduce(values, reduction)


def _gaussian_filter(x: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter over H and W of (N, H, W, C), 'valid' positions only."""
    offsets = np.arange(SSIM_TAPS) - (SSIM_TAPS - 1) / 2
    g = np.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    g /= g.sum()
    for axis in (1, 2):
        windows = np.lib.stride_tricks.sliding_window_view(x, SSIM_TAPS, axis=axis)
        x = windows @ g
    return x


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, reduction: str = "mean"):
    """Structural similarity per image pair, averaged over channels and window positions.

    Gaussian window (sigma 1.5, 11x11, 'valid' positions only, as in Wang et al.), constants
    ``C1 = (0.01 L)^2`` and ``C2 = (0.03 L)^2`` with ``L = data_range``. Images need H, W >= 11.
    ``reduction`` as for :func:`psnr`.
    """
    a, b = _pair(a, b)
    if min(a.shape[1:3]) < SSIM_TAPS:
        raise ValueError(f"SSIM needs images of at least {SSIM_TAPS}x{SSIM_TAPS}")
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_a, mu_b = _gaussian_filter(a), _gaussian_filter(b)
    var_a = _gaussian_filter(a * a) - mu_a**2
    var_b = _gaussian_filter(b * b) - mu_b**2
    cov = _gaussian_filter(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return _reduce(index.mean(axis=(1, 2, 3)), reduction)


def _reduce(values: np.ndarray, reduction: str):
    if reduction == "mean":
        return float(values.mean())
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def load_digits_16(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (N, 16, 16, 1) images in [0, 1] and their labels.

    The 8x8 images (values 0-16) are scaled to [0, 1] and upsampled bilinearly to 16x16
    (``align_corners=False``). ``split`` is ``"train"`` (1257 images), ``"test"`` (540, the
    held-out reference) or ``"all"``; the split is stratified with a fixed seed.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data need scikit-learn: pip install 'invardiff[train]'"
        ) from exc
    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    images = x.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    labels = data.target.astype(np.int64)
    if split == "all":
        return images, labels
    parts = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    if split == "train":
        return parts[0], parts[2]
    if split == "test":
        return parts[1], parts[3]
    raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")


class DigitsClassifier(nn.Module):
    """Two 3x3 conv layers (16, 32 channels, each ReLU + 2x2 max-pool), a 64-d feature layer
    (ReLU) and a 10-way linear head; input (N, 1, 16, 16) in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def save(self, path: Path, record: dict) -> None:
        """Write the weights (safetensors) and ``record`` as JSON next to them."""
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))
        path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")


@lru_cache(maxsize=4)
def load_classifier(path: str | Path = CLASSIFIER_PATH) -> DigitsClassifier:
    """The committed digits classifier (float32, eval mode)."""
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    images = _batched(images)
    if images.shape[1:] != (DIGITS_SIZE, DIGITS_SIZE, 1):
        raise ValueError(f"expected (N, 16, 16, 1) digits, got {images.shape}")
    return torch.from_numpy(images).float().permute(0, 3, 1, 2)


@torch.no_grad()
def classify(images: np.ndarray, classifier: DigitsClassifier | None = None) -> np.ndarray:
    """Predicted digit (0-9) of each (16, 16, 1) image."""
    model = classifier or load_classifier()
    return model(_to_tensor(images)).argmax(1).numpy()


@torch.no_grad()
def features(images: np.ndarray, classifier: DigitsClassifier | None = None) -> np.ndarray:
    """The classifier's 64-d feature vector of each image, as float64."""
    model = classifier or load_classifier()
    return model.features(_to_tensor(images)).double().numpy()


def accuracy(images: np.ndarray, labels, classifier: DigitsClassifier | None = None) -> float:
    """Fraction of images the classifier assigns to their intended ``labels``."""
    return float((classify(images, classifier) == np.asarray(labels)).mean())


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_from_features(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows are samples).

    ``|mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2)``, with square roots of
    symmetric PSD matrices from ``numpy.linalg.eigh``.
    """
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root_x = _psd_sqrt(cov_x)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_x @ cov_y @ root_x), 0, None)).sum()
    distance = ((mu_x - mu_y) ** 2).sum() + np.trace(cov_x) + np.trace(cov_y) - 2 * cross
    return max(float(distance), 0.0)  # rounding can leave a tiny negative for equal sets


@lru_cache(maxsize=1)
def _reference_features() -> np.ndarray:
    return features(load_digits_16("test")[0])


def frechet_distance(
    images: np.ndarray,
    reference: np.ndarray | None = None,
    classifier: DigitsClassifier | None = None,
) -> float:
    """Frechet distance of ``images`` to ``reference`` images in classifier feature space.

    The default reference is the 540 held-out digits of :func:`load_digits_16`. Like FID it is
    biased upwards for small sample counts: compare figures at equal N (200 real training
    digits score about 6 against the held-out set, pure noise several hundred).
    """
    if reference is None and classifier is None:
        ref = _reference_features()
    else:
        ref = features(
            reference if reference is not None else load_digits_16("test")[0], classifier
        )
    return frechet_from_features(features(images, classifier), ref)

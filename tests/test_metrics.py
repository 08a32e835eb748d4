"""Paired fidelity metrics and the digits classifier / Frechet distance."""

from __future__ import annotations

import numpy as np
import pytest

from invardiff import metrics

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def heldout():
    return metrics.load_digits_16("test")


@pytest.fixture(scope="module")
def train_digits():
    return metrics.load_digits_16("train")


def _noise(shape, seed=0):
    return np.random.default_rng(seed).random(shape)


def test_psnr_of_identical_images_is_inf_and_matches_formula():
    a = _noise((3, 16, 16, 1))
    assert metrics.psnr(a, a) == np.inf
    b = np.clip(a + 0.1, 0, 1)
    mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(
        metrics.psnr(a, b, reduction="none"), 10 * np.log10(1 / mse), rtol=1e-12
    )
    assert metrics.psnr(a[0], b[0]) == pytest.approx(10 * np.log10(1 / mse[0]))


def test_psnr_falls_as_noise_grows():
    a = _noise((4, 16, 16, 3))
    rng = np.random.default_rng(1)
    small = np.clip(a + 0.01 * rng.standard_normal(a.shape), 0, 1)
    large = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    assert metrics.psnr(a, small) > 35 > metrics.psnr(a, large)


def test_ssim_identical_is_one_and_orders_distortions():
    a = _noise((2, 16, 16, 1), seed=2)
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    rng = np.random.default_rng(3)
    slight = np.clip(a + 0.02 * rng.standard_normal(a.shape), 0, 1)
    heavy = np.clip(a + 0.3 * rng.standard_normal(a.shape), 0, 1)
    assert 1.0 > metrics.ssim(a, slight) > metrics.ssim(a, heavy)
    assert metrics.ssim(a, 1 - a) < 0
    assert metrics.ssim(a, slight, reduction="none").shape == (2,)


def test_ssim_is_symmetric_and_rejects_bad_shapes():
    a, b = _noise((16, 16, 1), seed=4), _noise((16, 16, 1), seed=5)
    assert metrics.ssim(a, b) == pytest.approx(metrics.ssim(b, a))
    with pytest.raises(ValueError):
        metrics.ssim(a, b[:, :8])
    with pytest.raises(ValueError):
        metrics.ssim(_noise((8, 8, 1)), _noise((8, 8, 1)))


def test_digits_data_shapes(heldout, train_digits):
    images, labels = heldout
    assert images.shape == (540, 16, 16, 1) and images.dtype == np.float32
    assert train_digits[0].shape == (1257, 16, 16, 1)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert np.bincount(labels).min() >= 50


def test_classifier_accuracy_on_heldout(heldout):
    images, labels = heldout
    assert metrics.accuracy(images, labels) >= 0.95
    assert metrics.features(images[:5]).shape == (5, 64)


def test_frechet_distance_separates_real_from_degraded(heldout, train_digits):
    images, labels = train_digits
    # 20 real training digits per class, like the models' quality check.
    images = np.concatenate([images[np.flatnonzero(labels == d)[:20]] for d in range(10)])
    real = metrics.frechet_distance(images)
    rng = np.random.default_rng(0)
    noisy = metrics.frechet_distance(
        np.clip(images + 0.15 * rng.standard_normal(images.shape), 0, 1)
    )
    noise = metrics.frechet_distance(rng.random(images.shape))
    assert real < 12
    assert real < noisy < noise
    assert noise > 300
    assert metrics.frechet_distance(heldout[0], reference=heldout[0]) == pytest.approx(0, abs=1e-3)


def test_frechet_from_features_matches_gaussian_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 3))
    y = rng.standard_normal((4000, 3)) * 2 + 1
    # Two isotropic Gaussians: |mu|^2 + sum (s1 - s2)^2 = 3 + 3 = 6.
    assert metrics.frechet_from_features(x, y) == pytest.approx(6.0, abs=0.4)

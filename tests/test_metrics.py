"""Specification of the image metrics, bundle/scripts/runtime/metrics.py, on hand-computable cases: the paper's
per-slice PSNR and SSIM, the masked 3D scores of the volume convention, and their summary.

(Table 1, which ``evaluate.json`` computes with them, is specified in ``test_evaluation.py``.)
"""

from __future__ import annotations

import math

import pytest
import torch
from monai.metrics.regression import compute_ssim_and_cs

from scripts.runtime.metrics import (
    paper_slice_scores,
    percentile_unit,
    psnr_in_mask,
    ssim_in_mask,
    ssim_map,
    summarise,
    volume_scores,
)


def test_identical_images_give_ssim_one_and_infinite_psnr():
    real = torch.rand(3, 1, 32, 32) + 0.1
    psnr, ssim = paper_slice_scores(real.clone(), real)
    assert torch.isinf(psnr).all() and torch.allclose(ssim, torch.ones(3), atol=1e-6)
    s = summarise(psnr.tolist() + [20.0, 30.0])
    assert s["n_infinite"] == 3 and s["n"] == 2 and s["mean"] == pytest.approx(25.0) and s["std"] == pytest.approx(5.0)
    mask = torch.zeros(40, 40, 30, dtype=torch.bool)
    mask[10:30, 10:30, 8:22] = True
    vol = torch.rand(40, 40, 30)
    assert math.isinf(psnr_in_mask(vol, vol.clone(), mask))
    assert ssim_in_mask(vol, vol.clone(), mask) == pytest.approx(1.0, abs=1e-5)


def test_known_error_gives_the_psnr_it_implies():
    # real: 0.5 everywhere with one pixel at 1 (so the per-slice max scaling leaves it unchanged);
    # pred: the same with +-d on every other pixel -> MSE = d^2 (N - 1) / N exactly
    n, d = 64, 0.04
    real = torch.full((1, 1, n, n), 0.5)
    real[..., 0, 0] = 1.0
    sign = torch.ones(n, n)
    sign[::2, 1::2] = sign[1::2, ::2] = -1
    pred = real + d * sign
    pred[..., 0, 0] = 1.0
    psnr, _ = paper_slice_scores(pred, real)
    assert float(psnr[0]) == pytest.approx(10 * math.log10(1 / (d**2 * (n * n - 1) / (n * n))), abs=1e-3)
    # Gaussian noise of sigma 0.05 on a volume: PSNR ~ 10 log10(1 / 0.05^2) = 26.02 dB inside the mask
    gen = torch.Generator().manual_seed(0)
    vol = torch.full((50, 50, 20), 0.5)
    noisy = vol + 0.05 * torch.randn(vol.shape, generator=gen)
    assert psnr_in_mask(noisy, vol, torch.ones_like(vol, dtype=torch.bool)) == pytest.approx(26.02, abs=0.1)


def test_separable_ssim_map_equals_monai():
    x = torch.rand(1, 1, 30, 31, 25)
    y = (x + 0.3 * torch.rand_like(x)).clamp(0, 1)
    ref, _ = compute_ssim_and_cs(x, y, spatial_dims=3, kernel_size=[11] * 3, kernel_sigma=[1.5] * 3, data_range=1.0)
    assert ssim_map(x, y).shape == ref.shape == (1, 1, 20, 21, 15)
    assert torch.allclose(ssim_map(x, y), ref, atol=1e-4)
    x2, y2 = x[..., 0], y[..., 0]
    ref2, _ = compute_ssim_and_cs(x2, y2, spatial_dims=2, kernel_size=[11] * 2, kernel_sigma=[1.5] * 2)
    assert torch.allclose(ssim_map(x2, y2), ref2, atol=1e-5)


def test_masked_ssim_only_looks_inside_the_region():
    vol = torch.rand(40, 40, 30)
    other = vol.clone()
    other[:, :, :10] = torch.rand(40, 40, 10)  # differs only far from the mask
    mask = torch.zeros_like(vol, dtype=torch.bool)
    mask[10:30, 10:30, 20:25] = True
    assert ssim_in_mask(other, vol, mask) == pytest.approx(1.0, abs=1e-5)
    assert math.isnan(ssim_in_mask(other, vol, torch.zeros_like(mask)))
    assert math.isnan(psnr_in_mask(other, vol, torch.zeros_like(mask)))


def test_percentile_unit_and_volume_scores():
    vol = torch.zeros(40, 40, 30)
    vol[5:35, 5:35, 5:25] = torch.rand(30, 30, 20) * 1000 + 100
    unit = percentile_unit(vol)
    assert float(unit.min()) == 0.0 and float(unit.max()) == 1.0
    assert float(percentile_unit(torch.full((4, 4, 4), 7.0)).abs().max()) == 0.0
    brain = vol > 0
    tumour = torch.zeros_like(brain)
    tumour[15:25, 15:25, 10:20] = True
    scores = volume_scores(vol * 3.0, vol, brain, tumour)  # a global gain is undone by the normalisation
    assert scores["psnr_brain"] > 100  # equal up to float rounding
    for key in ("ssim_brain", "ssim_tumour", "ssim_healthy"):
        assert scores[key] == pytest.approx(1.0, abs=1e-5)
    worse = volume_scores(vol * (1 + 0.3 * torch.rand_like(vol)), vol, brain, tumour)
    assert 0 < worse["ssim_brain"] < 1 and math.isfinite(worse["psnr_brain"])
    assert math.isnan(volume_scores(vol, vol, brain, torch.zeros_like(brain))["ssim_tumour"])

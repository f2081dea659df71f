"""Specification of the image metrics, bundle/scripts/runtime/metrics.py, on hand-computable cases: the paper's
per-slice PSNR and SSIM, the masked 3D scores of the volume convention, and their summary.

(Table 1, which ``evaluate.json`` computes with them, is specified in ``test_evaluation.py``.)
"""

from __future__ import annotations

import math

import pytest
import torch
from monai.metrics.regression import compute_ssim_and_cs

from monai.metrics import SSIMMetric

from scripts.runtime.metrics import (
    PROTOCOL_MIN_BRAIN,
    brain_unit,
    paper_slice_scores,
    protocol_brain,
    protocol_scores,
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


# ------------------------------------------------------------------------------------------ quality protocol
def _volume(shape=(60, 64, 50), seed=0):
    """A smooth positive 'brain' (a ball) with texture, background 0, and its real/pred pair."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij"))
    ball = (grid**2).sum(0) < 0.9
    real = (torch.rand(shape, generator=g) + 1.0) * ball
    return real, ball


def test_protocol_brain_drops_the_lowest_percent_of_the_t2():
    t2, ball = _volume()
    brain = protocol_brain(t2)
    assert brain.sum() < ball.sum() and abs(brain.sum() / ball.sum() - 0.99) < 0.005
    assert not brain[~ball].any()


def test_brain_unit_maps_brain_percentiles_to_zero_and_one_and_keeps_background():
    real, ball = _volume()
    u = brain_unit(real * 7 + 3 * ball, ball)  # affine changes of the brain values do not matter
    assert torch.allclose(u, brain_unit(real, ball), atol=1e-5)
    assert u[~ball].eq(0).all() and u.max() == 1 and (u[ball] == 0).float().mean() < 0.01


def test_protocol_slice_ssim_is_monai_ssim_of_each_slice_with_enough_brain():
    real, ball = _volume()
    pred = real + 0.2 * torch.rand(real.shape, generator=torch.Generator().manual_seed(1)) * ball
    brain = protocol_brain(real)
    scores = protocol_scores(pred, real, brain, torch.zeros_like(ball))
    p, r = brain_unit(pred, brain), brain_unit(real, brain)
    metric = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=11, kernel_sigma=1.5, reduction="none")
    for key, axis in (("protocol_ssim_axial", 2), ("protocol_ssim_sagittal", 0)):
        keep = brain.sum(dim=tuple(a for a in range(3) if a != axis)) > PROTOCOL_MIN_BRAIN
        slices_p = p.movedim(axis, 0)[keep][:, None]
        slices_r = r.movedim(axis, 0)[keep][:, None]
        assert 0 < keep.sum() < len(keep)  # the threshold leaves out the small slices at the ball's poles
        assert scores[key] == pytest.approx(float(metric(slices_p, slices_r).mean()), abs=1e-5)
    assert math.isnan(scores["protocol_ssim_tumour"])  # no tumour


def test_protocol_ignores_slices_with_little_brain_and_tumour_ssim_looks_at_the_tumour_only():
    real, ball = _volume()
    brain = protocol_brain(real)
    axial_area = brain.sum(dim=(0, 1))
    small = int(torch.nonzero((axial_area > 0) & (axial_area <= PROTOCOL_MIN_BRAIN))[0])
    pred = real.clone()
    pred[:, :, small] *= 0.3  # an error on a slice with too little brain for the axial mean...
    pred[:4] = real[:4]  # (the ball does not reach the first sagittal slices)
    tumour = torch.zeros_like(ball)
    tumour[25:35, 27:37, 20:30] = True  # ...and far from this tumour
    scores = protocol_scores(pred, real, brain, tumour)
    # (not exactly 1: the damaged slice moves the pred's brain percentiles, and so its scaling, a little)
    assert scores["protocol_ssim_axial"] == pytest.approx(1.0, abs=1e-4)
    assert scores["protocol_ssim_tumour"] == pytest.approx(1.0, abs=1e-4)
    # the sagittal slices cross the damaged axial slice
    assert scores["protocol_ssim_sagittal"] < scores["protocol_ssim_axial"] - 1e-4
    assert scores["protocol_psnr"] < 60


def test_protocol_region_scores_split_the_brain_into_tumour_and_healthy():
    real, ball = _volume()
    brain = protocol_brain(real)
    tumour = torch.zeros_like(ball)
    tumour[25:35, 27:37, 20:30] = True
    pred = real.clone()
    pred[tumour] = 1.0  # wrong inside the tumour only
    scores = protocol_scores(pred, real, brain, tumour)
    p, r = brain_unit(pred, brain), brain_unit(real, brain)
    healthy = brain & ~tumour
    for key, region in (("protocol_psnr_tumour", tumour), ("protocol_psnr_healthy", healthy)):
        mse = float(((p - r)[region] ** 2).mean())
        assert scores[key] == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
    assert scores["protocol_psnr_tumour"] < 20 < scores["protocol_psnr_healthy"]
    # healthy SSIM averages the axial maps over healthy voxels: near 1 away from the tumour, below the tumour's
    assert scores["protocol_ssim_tumour"] < scores["protocol_ssim_healthy"] < 1
    assert scores["protocol_ssim_healthy"] > scores["protocol_ssim_axial"] - 1e-6
    no_tumour = protocol_scores(pred, real, brain, torch.zeros_like(ball))
    assert math.isnan(no_tumour["protocol_psnr_tumour"]) and math.isnan(no_tumour["protocol_ssim_tumour"])


def test_merge_over_seeds_gives_the_spread_of_the_seed_means():
    import numpy as np

    from scripts.runtime.metrics import merge_over_seeds

    seeds = [{"methods": {"mgan": {"flair": {"psnr": {"mean": m, "std": s, "n": 40}}}}, "settings": {"n_cases": 2}}
             for m, s in ((20.0, 1.0), (22.0, 3.0), (float("nan"), 2.0))]  # fmt: skip
    merged = merge_over_seeds(seeds)
    cell = merged["methods"]["mgan"]["flair"]["psnr"]
    assert cell["mean"] == 21.0 and cell["std"] == pytest.approx(np.std([20.0, 22.0], ddof=1))
    assert cell["n"] == 2 and cell["n_seeds"] == 3 and cell["within_std"] == 2.0
    assert merged["settings"] == {"n_cases": 2}
    assert merge_over_seeds(seeds[:1])["methods"]["mgan"]["flair"]["psnr"]["std"] == 0.0
    with pytest.raises(ValueError):
        merge_over_seeds([])


# --- the BraSyn challenge's SSIM ----------------------------------------------------------------------------------


def _torchmetrics_ssim_by_hand(pred, real):
    """torchmetrics' 3D SSIM written out voxel by voxel (numpy): reflect-pad by 5, an 11^3 Gaussian (sigma 1.5) window
    at each voxel, data range = the larger max - min, variances clamped at 0; returns (map, border-cropped mean)."""
    import numpy as np

    x = np.arange(11) - 5.0
    g = np.exp(-(x / 1.5) ** 2 / 2)
    g /= g.sum()
    w = g[:, None, None] * g[None, :, None] * g[None, None, :]
    p, r = (np.pad(np.asarray(v, np.float64), 5, mode="reflect") for v in (pred, real))
    rng = max(float(pred.max() - pred.min()), float(real.max() - real.min()))
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    out = np.zeros(pred.shape)
    for i, j, k in np.ndindex(*pred.shape):
        a, b = p[i : i + 11, j : j + 11, k : k + 11], r[i : i + 11, j : j + 11, k : k + 11]
        mp, mr = (w * a).sum(), (w * b).sum()
        vp, vr = max((w * a * a).sum() - mp**2, 0.0), max((w * b * b).sum() - mr**2, 0.0)
        cov = (w * a * b).sum() - mp * mr
        out[i, j, k] = ((2 * mp * mr + c1) * (2 * cov + c2)) / ((mp**2 + mr**2 + c1) * (vp + vr + c2))
    return out, out[5:-5, 5:-5, 5:-5].mean()


def test_full_ssim_map_is_torchmetrics_ssim_computed_by_hand():
    from scripts.runtime.metrics import full_ssim_map

    torch.manual_seed(0)
    real = torch.rand(13, 12, 14)
    pred = 0.7 * real + 0.3 * torch.rand(13, 12, 14)
    full, score = full_ssim_map(pred, real)
    expected, expected_score = _torchmetrics_ssim_by_hand(pred.numpy(), real.numpy())
    assert full.shape == real.shape
    assert torch.allclose(full.double(), torch.from_numpy(expected), atol=1e-5)
    assert score == pytest.approx(expected_score, abs=1e-6)
    assert full_ssim_map(real, real)[1] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("box", [(slice(9, 14), slice(7, 11), slice(6, 10)), (slice(0, 6), slice(12, 20), slice(3, 9))])
def test_full_ssim_map_over_the_non_zero_box_equals_the_whole_volumes_map(box):
    """Only the box around the non-zero voxels is filtered (inside the volume, and touching its border): the map
    and the score are those of the whole volume's filtering."""
    from scripts.runtime.metrics import _gaussian_ssim, full_ssim_map

    torch.manual_seed(1)
    real, pred = torch.zeros(26, 20, 18), torch.zeros(26, 20, 18)
    real[box] = torch.rand(real[box].shape)
    pred[box] = 0.6 * real[box] + 0.4 * torch.rand(real[box].shape)
    rng = float(max(real.max() - real.min(), pred.max() - pred.min()))
    whole = _gaussian_ssim(pred.double()[None, None], real.double()[None, None], rng, "reflect", crop=False)[0]
    full, score = full_ssim_map(pred, real)
    assert torch.allclose(full.double(), whole, atol=1e-5)
    assert score == pytest.approx(float(whole[5:-5, 5:-5, 5:-5].mean()), abs=1e-6)


def test_brasyn_normalisation_clips_to_each_volumes_own_percentiles_with_a_floor_at_zero():
    import numpy as np

    from scripts.runtime.metrics import brasyn_unit

    v = torch.arange(1000, dtype=torch.float64).reshape(10, 10, 10) - 100  # -100 .. 899: 0.5th percentile < 0
    low, high = 0.0, float(np.percentile(v.numpy(), 99.5))
    unit = brasyn_unit(v)
    assert float(unit.min()) == 0.0 and float(unit.max()) == 1.0
    assert float(unit[5, 0, 0]) == pytest.approx((400 - low) / (high - low))
    assert float(brasyn_unit(torch.full((4, 4, 4), 3.0)).abs().max()) == 0.0  # constant: nothing to scale


def test_brasyn_tumour_and_healthy_scores_by_hand():
    """The two readings of the challenge's code on a case small enough to compute by hand: the SSIM map of the
    masked volumes averaged in the region, and the whole-volume score of the masked volumes."""
    from scripts.runtime.metrics import brasyn_scores, brasyn_unit

    torch.manual_seed(1)
    real = torch.rand(13, 12, 14) * 100
    pred = real + 20 * torch.rand(13, 12, 14)
    tumour = torch.zeros(13, 12, 14, dtype=torch.bool)
    tumour[4:9, 3:8, 5:10] = True
    scores = brasyn_scores(pred, real, tumour)
    p, r = brasyn_unit(pred).numpy(), brasyn_unit(real).numpy()
    m = tumour.numpy()
    full, whole = _torchmetrics_ssim_by_hand(p, r)
    t_map, t_volume = _torchmetrics_ssim_by_hand(p * m, r * m)
    h_map, h_volume = _torchmetrics_ssim_by_hand(p * ~m, r * ~m)
    assert scores["brasyn_ssim"] == pytest.approx(whole, abs=1e-5)
    assert scores["brasyn_ssim_tumour"] == pytest.approx(t_map[m].mean(), abs=1e-5)
    assert scores["brasyn_ssim_healthy"] == pytest.approx(h_map[~m].mean(), abs=1e-5)
    assert scores["brasyn_ssim_tumour_volume"] == pytest.approx(t_volume, abs=1e-5)
    assert scores["brasyn_ssim_healthy_volume"] == pytest.approx(h_volume, abs=1e-5)
    assert math.isnan(brasyn_scores(pred, real, torch.zeros_like(tumour))["brasyn_ssim_tumour"])

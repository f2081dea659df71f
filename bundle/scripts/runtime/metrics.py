"""Image-quality metrics of Table 1, in the two conventions peers use (see ``docs/evaluation.md``).

- **Paper convention** (TC-MGAN's reference code): 2D 128x128 axial slices kept by the brain filter, each slice of the
  synthesised and of the real image scaled to [0, 1] by its own maximum, whole slice (no mask); PSNR (data range 1)
  and SSIM (Gaussian window 11, sigma 1.5) per slice, averaged over slices. :func:`paper_slice_scores`.
- **Volume convention** (BraSyn-style): each 3D volume clipped to its own 0.5-99.5 percentiles (a negative lower bound
  is set to 0) and scaled to [0, 1] (:func:`percentile_unit`); PSNR and SSIM inside the brain, and SSIM inside the
  tumour and in the healthy brain (:func:`volume_scores`), SSIM as the 3D Gaussian SSIM map averaged inside a region.

Slice SSIM and PSNR are MONAI's ``SSIMMetric`` and ``PSNRMetric``. The SSIM *map* inside a region (:func:`ssim_map`)
is MONAI's ``compute_ssim_and_cs`` formula and kernel computed with MONAI's ``separable_filtering`` (three 1D passes
instead of one 11x11x11 convolution: ~40x less work on a brain volume; equal up to float rounding, tested). Like
MONAI's, it is a "valid" map (no padding): ``win - 1`` voxels shorter along each axis, its voxel ``i`` centred on
input voxel ``i + win // 2``; a region mask is cropped the same way before averaging. An exact copy gives SSIM 1 and
PSNR ``inf`` (MSE 0); aggregation (:func:`summarise`) reports how many values were infinite and averages the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric
from monai.networks.layers import separable_filtering

#: SSIM settings shared by both conventions (the skimage/torchmetrics Gaussian defaults).
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def unit_by_max(images: torch.Tensor) -> torch.Tensor:
    """Each image of ``(N, C, H, W)`` divided by its own maximum (the reference code's per-slice normalisation);
    negative values are set to 0, an all-zero image stays 0."""
    images = images.float().clamp_min(0)
    top = images.amax(dim=tuple(range(1, images.ndim)), keepdim=True)
    return images / top.clamp_min(1e-8)


def paper_slice_scores(pred: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PSNR and SSIM of each slice pair, paper convention.

    Args:
        pred, real: ``(N, 1, H, W)`` non-negative intensities (any scale; each slice is scaled by its own maximum).

    Returns:
        ``(psnr (N,), ssim (N,))``; PSNR is ``inf`` where the scaled slices are identical.
    """
    if pred.shape != real.shape or pred.ndim != 4:
        raise ValueError(f"expected two (N, 1, H, W) tensors of one shape, got {tuple(pred.shape)}, {tuple(real.shape)}")
    p, r = unit_by_max(pred), unit_by_max(real)
    psnr = PSNRMetric(max_val=1.0, reduction="none")(p, r).flatten()
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=SSIM_WINDOW, kernel_sigma=SSIM_SIGMA, reduction="none")
    return psnr, ssim(p, r).flatten()


def percentile_unit(volume: torch.Tensor, lower: float = 0.5, upper: float = 99.5) -> torch.Tensor:
    """BraSyn normalisation: clip to the volume's own ``lower``-``upper`` percentiles (over all voxels; a negative
    lower bound becomes 0) and scale linearly to [0, 1]. A constant volume becomes all zeros."""
    v = volume.float()
    lo, hi = (float(x) for x in np.percentile(v.cpu().numpy(), [lower, upper]))
    lo = max(lo, 0.0)
    if hi <= lo:
        return torch.zeros_like(v)
    return ((v.clamp(lo, hi) - lo) / (hi - lo)).clamp(0, 1)


def psnr_in_mask(pred: torch.Tensor, real: torch.Tensor, mask: torch.Tensor, data_range: float = 1.0) -> float:
    """PSNR over the voxels where ``mask`` is true (``inf`` when they agree exactly, ``nan`` for an empty mask)."""
    m = mask.bool()
    if not m.any():
        return float("nan")
    mse = float(((pred.float() - real.float())[m] ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 1D Gaussian MONAI's SSIM uses (centred sample points, no truncation beyond ``size``)."""
    dist = torch.arange((1 - size) / 2, (1 + size) / 2, 1.0)
    g = torch.exp(-((dist / sigma) ** 2) / 2)
    return g / g.sum()


def ssim_map(pred: torch.Tensor, real: torch.Tensor, data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03):
    """Gaussian SSIM map of two ``(B, 1, *spatial)`` images, "valid" region only (see the module doc)."""
    dims = pred.ndim - 2
    half = SSIM_WINDOW // 2
    kernels = [_gaussian_1d().to(pred)] * dims
    inner = (slice(None), slice(None)) + (slice(half, -half),) * dims

    stats = torch.cat([pred, real, pred * pred, real * real, pred * real], dim=1)  # one grouped pass for all five
    mu_x, mu_y, mu_xx, mu_yy, mu_xy = separable_filtering(stats, kernels, mode="zeros")[inner].unbind(1)
    var_x, var_y, cov = mu_xx - mu_x**2, mu_yy - mu_y**2, mu_xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim = ((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)) * ((2 * cov + c2) / (var_x + var_y + c2))
    return ssim.unsqueeze(1)


def ssim_in_mask(pred: torch.Tensor, real: torch.Tensor, mask: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean of the 2D/3D Gaussian SSIM map over the voxels where ``mask`` is true (``nan`` when the mask holds no
    voxel at least ``SSIM_WINDOW // 2`` voxels from the border).

    ``pred``, ``real``, ``mask``: ``(H, W[, D])`` arrays. Only the mask's bounding box plus the window's half-width is
    computed (the map inside the mask does not depend on anything further away).
    """
    m = mask.bool()
    if not m.any():
        return float("nan")
    half = SSIM_WINDOW // 2
    box = []
    for axis in range(m.ndim):  # bounding box of the mask, widened by half a window (within the image)
        hits = torch.nonzero(m.any(dim=tuple(a for a in range(m.ndim) if a != axis)))
        lo, hi = int(hits.min()), int(hits.max()) + 1
        box.append(slice(max(lo - half, 0), min(hi + half, m.shape[axis])))
    p, r, m = pred[tuple(box)].float(), real[tuple(box)].float(), m[tuple(box)]
    if any(s <= 2 * half for s in m.shape):
        return float("nan")
    inner = m[tuple(slice(half, s - half) for s in m.shape)]
    if not inner.any():
        return float("nan")
    return float(ssim_map(p[None, None], r[None, None], data_range)[0, 0][inner].mean())


def volume_scores(pred: torch.Tensor, real: torch.Tensor, brain: torch.Tensor, tumour: torch.Tensor) -> dict:
    """Volume-convention scores of one synthesised volume against the real one (both ``(H, W, D)``, raw intensities).

    Both are normalised with :func:`percentile_unit`. Returns ``psnr_brain`` and ``ssim_brain`` (inside ``brain``),
    and the BraSyn pair ``ssim_tumour`` (images multiplied by the tumour mask, SSIM map averaged inside it) and
    ``ssim_healthy`` (same with the healthy brain, ``brain & ~tumour``). ``nan`` where a region is empty.
    """
    p, r = percentile_unit(pred), percentile_unit(real)
    brain, tumour = brain.bool(), tumour.bool() & brain.bool()
    healthy = brain & ~tumour
    return {
        "psnr_brain": psnr_in_mask(p, r, brain),
        "ssim_brain": ssim_in_mask(p, r, brain),
        "ssim_tumour": ssim_in_mask(p * tumour, r * tumour, tumour),
        "ssim_healthy": ssim_in_mask(p * healthy, r * healthy, healthy),
    }


def summarise(values: Sequence[float]) -> dict:
    """``{"mean", "std", "n", "n_infinite", "n_nan"}`` of the finite values (population std); infinite values
    (identical images) and nan (empty regions) are counted, not averaged."""
    a = np.asarray(list(values), dtype=np.float64)
    finite = a[np.isfinite(a)]
    return {
        "mean": float(finite.mean()) if finite.size else float("nan"),
        "std": float(finite.std()) if finite.size else float("nan"),
        "n": int(finite.size),
        "n_infinite": int(np.isinf(a).sum()),
        "n_nan": int(np.isnan(a).sum()),
    }

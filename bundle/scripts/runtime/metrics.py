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

- **Quality protocol** (the bar a synthesis must clear against trivial baselines, docs/evaluation.md): brain = T2
  above the 1st percentile of its non-zero voxels; each volume clipped to its own brain 0.5-99.5 percentiles; PSNR
  over the brain; SSIM as the mean over axial (and, separately, sagittal) slices with > 2000 brain voxels of each
  slice's 2D SSIM; tumour SSIM = axial SSIM maps averaged over tumour voxels. :func:`protocol_scores`.
- **The BraSyn challenge's SSIM** (its published ``ssim.py``), so that figures can be set beside the challenge's:
  each whole volume clipped to its own 0.5 / 99.5 percentiles (over all its voxels, background included; the lower
  one floored at 0) and scaled to [0, 1] (:func:`brasyn_unit`); torchmetrics' 3D SSIM with its defaults (Gaussian
  11 / 1.5, reflect padding, data range inferred from the two volumes, :func:`full_ssim_map`); the tumour score on
  both volumes with everything outside the tumour set to 0, the healthy score with the tumour set to 0.
  :func:`brasyn_scores`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

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


def _gaussian_ssim(p: torch.Tensor, r: torch.Tensor, data_range: float, mode: str, crop: bool,
                   k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """The Gaussian SSIM formula at each voxel of two ``(B, 1, *spatial)`` images, ``(B, *spatial)``: the five local
    statistics in one grouped pass of MONAI's separable filtering (``mode``: its padding), kept whole or ``crop``-ped
    to the "valid" region half a window from every border. Negative local variances (rounding) count as 0."""
    half = SSIM_WINDOW // 2
    kernels = [_gaussian_1d().to(p)] * (p.ndim - 2)
    stats = separable_filtering(torch.cat([p, r, p * p, r * r, p * r], dim=1), kernels, mode=mode)
    if crop:
        stats = stats[(slice(None), slice(None)) + (slice(half, -half),) * (p.ndim - 2)]
    mu_p, mu_r, mu_pp, mu_rr, mu_pr = stats.unbind(1)
    var_p, var_r = (mu_pp - mu_p**2).clamp_min(0), (mu_rr - mu_r**2).clamp_min(0)
    cov = mu_pr - mu_p * mu_r
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mu_p * mu_r + c1) / (mu_p**2 + mu_r**2 + c1)) * ((2 * cov + c2) / (var_p + var_r + c2))


def ssim_map(pred: torch.Tensor, real: torch.Tensor, data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03):
    """Gaussian SSIM map of two ``(B, 1, *spatial)`` images, "valid" region only (see the module doc)."""
    return _gaussian_ssim(pred, real, data_range, "zeros", crop=True, k1=k1, k2=k2).unsqueeze(1)


def full_ssim_map(pred: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, float]:
    """torchmetrics' ``StructuralSimilarityIndexMeasure()`` on two 3D volumes ``(X, Y, Z)``, written with MONAI's
    separable filtering: the SSIM map at every voxel (the volumes reflect-padded by half the 11-voxel Gaussian
    window, sigma 1.5; ``c1``, ``c2`` from ``0.01`` / ``0.03`` times the data range, which is inferred as the larger
    of the two volumes' max - min; variances clamped at 0), and the score, the map's mean without a half-window
    border.

    Computed in float32 (as torchmetrics on float32 volumes) and only over the box that holds every non-zero voxel
    of either volume, grown by a whole window: a voxel farther than half a window from that box sees zeros only
    (its map is exactly 1), and the grown box's own reflect padding reflects zeros where it does not meet the
    volume's border. The same map as the whole volume's, 4-10 times faster on a brain volume."""
    half = SSIM_WINDOW // 2
    p, r = torch.as_tensor(pred).float(), torch.as_tensor(real).float()
    data_range = float(torch.maximum(p.max() - p.min(), r.max() - r.min()))
    if data_range == 0:  # two constant volumes: torchmetrics' formula on them, everywhere
        full = _gaussian_ssim(p[None, None], r[None, None], data_range, "reflect", crop=False)[0]
    else:  # a non-zero range: some voxel is non-zero
        nonzero = torch.nonzero((p != 0) | (r != 0))
        lo = (nonzero.min(dim=0).values - 2 * half).clamp_min(0).tolist()
        hi = [min(int(h) + 2 * half + 1, n) for h, n in zip(nonzero.max(dim=0).values.tolist(), p.shape)]
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        full = torch.ones(p.shape, dtype=torch.float32)
        full[box] = _gaussian_ssim(p[box][None, None], r[box][None, None], data_range, "reflect", crop=False)[0]
    return full, float(full[half:-half, half:-half, half:-half].double().mean())


def brasyn_unit(volume: torch.Tensor) -> torch.Tensor:
    """The BraSyn challenge's normalisation of one volume: clipped to its own 0.5 and 99.5 percentiles over all its
    voxels (numpy's linear interpolation; a negative lower one set to 0), then scaled to [0, 1] (all 0 when the
    two percentiles meet)."""
    v = np.asarray(torch.as_tensor(volume).detach().cpu(), dtype=np.float64)
    low, high = np.percentile(v, [0.5, 99.5])
    low = max(float(low), 0.0)
    if high <= low:
        return torch.zeros(v.shape)
    return torch.from_numpy((np.clip(v, low, high) - low) / (high - low))


#: :func:`brasyn_scores`' keys: the whole volume, then tumour and healthy in the two readings of the challenge's code.
BRASYN_METRICS = ("brasyn_ssim", "brasyn_ssim_tumour", "brasyn_ssim_healthy", "brasyn_ssim_tumour_volume",
                  "brasyn_ssim_healthy_volume")  # fmt: skip


def brasyn_scores(pred: torch.Tensor, real: torch.Tensor, tumour: torch.Tensor) -> dict:
    """The BraSyn challenge's 3D SSIM of a synthesised volume against the real one (both ``(X, Y, Z)``, any
    intensities; each normalised by :func:`brasyn_unit`), with ``tumour`` the whole-tumour mask (label > 0).

    - ``brasyn_ssim``: the whole volumes' score (:func:`full_ssim_map`);
    - ``brasyn_ssim_tumour`` / ``brasyn_ssim_healthy``: the volumes multiplied by the tumour mask (by its
      complement: everything outside the tumour, background included), their SSIM map averaged over the tumour
      (over everything outside it): what the challenge's ``ssim.py`` means to compute (as published it indexes the
      ``(score, map)`` pair torchmetrics returns, and does not run);
    - ``..._volume``: the other reading, the whole-volume score of those masked volumes.

    ``nan`` for the tumour scores of a case without tumour.
    """
    p, r = brasyn_unit(pred), brasyn_unit(real)
    m = torch.as_tensor(tumour).bool().cpu()
    out = {"brasyn_ssim": full_ssim_map(p, r)[1]}
    for name, region in (("tumour", m), ("healthy", ~m)):
        if not region.any():
            out[f"brasyn_ssim_{name}"] = out[f"brasyn_ssim_{name}_volume"] = float("nan")
            continue
        full, score = full_ssim_map(p * region, r * region)
        out[f"brasyn_ssim_{name}"], out[f"brasyn_ssim_{name}_volume"] = float(full[region].mean()), score
    return {k: out[k] for k in BRASYN_METRICS}


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


#: The quality protocol (docs/evaluation.md, "Quality protocol"): slices with more brain voxels than this count.
PROTOCOL_MIN_BRAIN = 2000
PROTOCOL_METRICS = ("protocol_psnr", "protocol_ssim_axial", "protocol_ssim_sagittal", "protocol_ssim_tumour")
#: The three planes' SSIM (the coronal one computed only when asked for) and brain PSNR: tri-planar synthesis.
PLANE_METRICS = ("protocol_psnr", "protocol_ssim_axial", "protocol_ssim_coronal", "protocol_ssim_sagittal")
#: Where the tumour-consistency loss should show: the protocol's PSNR and SSIM inside the tumour and in the healthy brain.
REGION_METRICS = ("protocol_psnr_tumour", "protocol_ssim_tumour", "protocol_psnr_healthy", "protocol_ssim_healthy")


def protocol_brain(t2: torch.Tensor) -> torch.Tensor:
    """The protocol's brain: T2 voxels above the 1st percentile of the T2's non-zero voxels."""
    t2 = t2.float()
    nonzero = t2[t2 > 0]
    if nonzero.numel() == 0:
        return torch.zeros_like(t2, dtype=torch.bool)
    return t2 > float(np.percentile(nonzero.cpu().numpy(), 1))


def brain_unit(volume: torch.Tensor, brain: torch.Tensor, lower: float = 0.5, upper: float = 99.5) -> torch.Tensor:
    """``volume`` clipped to the ``lower``-``upper`` percentiles of its brain voxels and scaled to [0, 1] (the whole
    volume is mapped, so background 0 stays 0 whenever the lower bound is >= 0)."""
    v = volume.float()
    lo, hi = (float(x) for x in np.percentile(v[brain.bool()].cpu().numpy(), [lower, upper]))
    if hi <= lo:
        return torch.zeros_like(v)
    return ((v.clamp(lo, hi) - lo) / (hi - lo)).clamp(0, 1)


def inverted_baseline(volume: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
    """The "inverted" trivial baseline of a modality: ``1 -`` :func:`brain_unit` inside its signal, 0 outside."""
    return (1 - brain_unit(volume, brain)) * (volume > 0)


def _slice_ssim_maps(p: torch.Tensor, r: torch.Tensor, axis: int, keep: torch.Tensor, chunk: int = 32):
    """Valid-region 2D SSIM maps ``(N, h - 10, w - 10)`` of the slices ``keep`` (bool over ``axis``)."""
    index = torch.nonzero(keep).flatten()
    maps = []
    for start in range(0, len(index), chunk):
        sel = index[start : start + chunk]
        ps = p.index_select(axis, sel).movedim(axis, 0)[:, None]
        rs = r.index_select(axis, sel).movedim(axis, 0)[:, None]
        maps.append(ssim_map(ps, rs)[:, 0])
    return torch.cat(maps) if maps else torch.zeros(0)


def _masked_map_mean(maps: torch.Tensor, mask: torch.Tensor, axis: int, keep: torch.Tensor) -> float:
    """Mean of slice SSIM ``maps`` (of the slices ``keep`` along ``axis``) over the voxels of ``mask`` inside the
    maps' valid region; ``nan`` when there is none."""
    if not len(maps):
        return float("nan")
    half = SSIM_WINDOW // 2
    inner = mask.index_select(axis, torch.nonzero(keep).flatten()).movedim(axis, 0)[:, half:-half, half:-half]
    return float(maps[inner].mean()) if inner.any() else float("nan")


def protocol_scores(pred: torch.Tensor, real: torch.Tensor, brain: torch.Tensor, tumour: torch.Tensor,
                    axial: int = 2, sagittal: int = 0, metrics=None, coronal: int = 1) -> dict:
    """Quality-protocol scores of one volume against the real one (both ``(H, W, D)`` raw, RAS: axis 0 runs
    left-right, axis 2 is axial); ``brain`` from :func:`protocol_brain` of the T2, ``tumour`` = label > 0.

    Each volume is normalised by :func:`brain_unit`. ``protocol_psnr``: over brain voxels. ``protocol_ssim_axial``
    and ``protocol_ssim_sagittal``: the mean over axial (sagittal) slices with more than ``PROTOCOL_MIN_BRAIN``
    brain voxels of the slice's SSIM (Gaussian window 11, sigma 1.5, data range 1: the mean of its valid SSIM
    map, as MONAI's ``SSIMMetric``). ``protocol_ssim_tumour``: the axial SSIM maps averaged over the tumour voxels
    (inside the maps' valid region); ``nan`` without tumour. The regions (:data:`REGION_METRICS`):
    ``protocol_psnr_tumour`` and ``protocol_psnr_healthy``, PSNR over the tumour's and over the healthy brain's
    (brain without tumour) voxels; ``protocol_ssim_healthy``, like the tumour SSIM: the axial SSIM maps averaged
    over the healthy-brain voxels (of every axial slice that has some, each voxel counting once).
    ``protocol_ssim_coronal`` (``coronal`` axis; only when ``metrics`` names it, :data:`PLANE_METRICS`): as the
    sagittal one, over coronal slices. ``metrics``: compute only these keys (None: all but the coronal SSIM; the
    SSIM maps are the costly part).
    """
    wanted = set(PROTOCOL_METRICS + REGION_METRICS if metrics is None else metrics)
    brain, tumour = brain.bool(), tumour.bool()
    healthy = brain & ~tumour
    p, r = brain_unit(pred, brain), brain_unit(real, brain)
    out = {"protocol_psnr": psnr_in_mask(p, r, brain)}
    planes = (("protocol_ssim_axial", axial), ("protocol_ssim_coronal", coronal), ("protocol_ssim_sagittal", sagittal))
    for name, axis in planes:
        if name in wanted:
            others = tuple(a for a in range(3) if a != axis)
            maps = _slice_ssim_maps(p, r, axis, brain.sum(dim=others) > PROTOCOL_MIN_BRAIN)
            out[name] = float(maps.mean(dim=(1, 2)).mean()) if len(maps) else float("nan")
    in_plane = tuple(a for a in range(3) if a != axial)
    for name, region in (("protocol_ssim_tumour", tumour), ("protocol_ssim_healthy", healthy)):
        if name in wanted:
            has = region.sum(dim=in_plane) > 0
            out[name] = _masked_map_mean(_slice_ssim_maps(p, r, axial, has), region, axial, has)
    out["protocol_psnr_tumour"] = psnr_in_mask(p, r, tumour)  # nan without tumour
    out["protocol_psnr_healthy"] = psnr_in_mask(p, r, healthy)
    return {k: v for k, v in out.items() if k in wanted}


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


def _is_stat(value) -> bool:
    return isinstance(value, Mapping) and "mean" in value and "std" in value


def merge_over_seeds(summaries: Sequence[Mapping]) -> dict:
    """One summary from the same summary of several training seeds (``scores.json`` of ``evaluate.json`` or of
    ``evaluate_downstream.json``, loaded): every statistic ``{"mean", "std", ...}`` becomes the mean and the sample
    standard deviation (ddof 1; 0 for one seed) over seeds of the per-seed means, with ``n`` = the number of seeds
    whose mean is finite, ``n_seeds`` and ``within_std`` (the mean of the per-seed stds: the spread over cases or
    slices). Other entries keep the first summary's value; entries missing from some summaries are left out.

    Raises:
        ValueError: no summaries.
    """
    if not summaries:
        raise ValueError("merge_over_seeds: no summaries")
    first = summaries[0]
    if _is_stat(first):
        means = np.asarray([float(s["mean"]) for s in summaries], dtype=np.float64)
        finite = means[np.isfinite(means)]
        within = np.asarray([float(s["std"]) for s in summaries], dtype=np.float64)
        return {
            "mean": float(finite.mean()) if finite.size else float("nan"),
            # one seed: no spread (0); several seeds of which fewer than two are finite: unknown (nan)
            "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0 if len(summaries) == 1 else float("nan"),
            "n": int(finite.size),
            "n_seeds": len(summaries),
            "within_std": float(np.nanmean(within)) if np.isfinite(within).any() else float("nan"),
        }
    if isinstance(first, Mapping):
        return {k: merge_over_seeds([s[k] for s in summaries]) for k in first
                if all(isinstance(s, Mapping) and k in s for s in summaries)}  # fmt: skip
    return first

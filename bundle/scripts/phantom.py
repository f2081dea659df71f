"""BraTS-like brain tumour phantom: T1, T1ce, T2, FLAIR and a tumour label, written in real BraTS file layouts.

Why: the bundle must build, train and be tested without the (licence-restricted) BraTS data. This module makes
cases that look and are stored like BraTS, so every loader, transform and metric runs on them unchanged.

How one case is made (see ``bundle/docs/phantom.md`` for the contrast table):

1. Anatomy: the MNI152 2009 grey/white-matter probability maps that ship inside the nilearn wheel, with
   CSF = clip(1 - GM - WM, 0, 1) inside the brain, are resampled into the 240x240x155 grid through a random
   per-case affine (rotation, scale, shift) plus a smooth elastic displacement.
2. Tumour: an irregular blob (a radial profile plus smoothed noise) at a random place inside the cerebrum,
   with nested compartments: necrosis inside an enhancing rim inside oedema (high-grade-like), or a
   non-enhancing core inside oedema (low-grade-like). Some cases get a small tumour or none. Large tumours push
   the surrounding tissue outwards (mass effect).
3. Contrast: each voxel is a partial-volume mix of tissues; every tissue has a mean value per modality from a
   signal-model table, jittered per case. Then a small blur (partial volume / point spread), tissue texture,
   a smooth multiplicative bias field and Rician noise are applied per modality, so no fixed lookup table maps
   T2 to the other modalities. Outside the brain every modality is exactly 0 (skull-stripped).
4. T1 versus T1ce: as in BraTS, they differ everywhere, not only in the tumour. T1ce is a high-resolution 3D
   gradient echo (stronger GM/WM contrast, darker CSF, sharp, less noise) in which contrast agent also shows
   outside the tumour: enhancing vessels in the CSF spaces and at the brain surface, the choroid plexus in
   the lateral ventricles and, in some cases, patches of dura at the brain's edge (``uptake``; not part of the
   label map). T1 is a 2D spin echo with thick axial slices (blurred along z) and more noise.

Run as a script::

    python bundle/scripts/phantom.py --output_dir data/phantom --num_cases 10 --seed 0 --layout brats2021

Only numpy, scipy, nibabel, torch, tqdm and fire are used; nilearn is not imported (its files are only read).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

if __package__ in (None, ""):  # run as a script: make the bundle folder importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the layouts, their file names and label values, and the channel order of a 4D (MSD) image
from scripts.runtime.conventions import CHANNELS, FILE_SUFFIXES, INTERNAL_LABELS, LAYOUTS, file_label  # noqa: E402
from scripts.runtime.files import write_atomic, write_json  # noqa: E402

__all__ = [
    "BRATS_SHAPE",
    "LAYOUTS",
    "MODALITIES",
    "BASE_CONTRAST",
    "brats_affine",
    "make_case",
    "generate",
    "case_seed",
    "region_means",
    "contrast_table",
    "TUMOUR_KINDS",
    "TUMOUR_KIND_P",
    "DOMAINS",
    "DOMAIN_RANGES",
]

BRATS_SHAPE = (240, 240, 155)  # BraTS / SRI24 grid, 1 mm isotropic
MODALITIES = ("t1", "t1ce", "t2", "flair")  # the column order of the contrast tables below

# Mean signal per tissue (rows) and modality (columns t1, t1ce, t2, flair) before the per-case jitter.
# T1, T2 and FLAIR come from the spin-echo signal-model sketch in the project notes (BrainWeb T1/T2/PD for
# CSF/GM/WM, assumed values for the tumour tissues), scaled so WM = 1 in T1 and T1ce, CSF = 1 in T2 and
# oedema = 1 in FLAIR. Following the notes, CSF and necrosis are made darker in T1 (about 0.3 of WM) than the
# plain equation gives, as in real scans. T1ce is modelled as the 3D gradient-echo (MPRAGE/SPGR-like)
# acquisition most BraTS sites use after contrast: stronger GM/WM contrast, darker CSF, necrosis and oedema
# than the 2D spin-echo T1, and gadolinium shortens the enhancing tumour's T1 (brightest tissue in T1ce).
BASE_CONTRAST = {
    #                 t1    t1ce  t2    flair
    "csf":          (0.30, 0.17, 1.00, 0.08),
    "gm":           (0.78, 0.65, 0.46, 0.58),
    "wm":           (1.00, 1.00, 0.33, 0.45),
    "oedema":       (0.66, 0.58, 0.84, 1.00),
    "necrosis":     (0.30, 0.20, 0.93, 0.38),
    "nonenhancing": (0.56, 0.50, 0.78, 0.84),
    "enhancing":    (0.70, 1.45, 0.62, 0.76),
}
TISSUES = tuple(BASE_CONTRAST)
CONTRAST_JITTER = 0.04  # standard deviation of the per-case, per-tissue, per-modality multiplicative jitter
CONTRAST_JITTER_CLIP = 0.10  # the jitter is clipped to +-10 %, which keeps the radiological orderings intact
T1CE_JITTER_MIX = (0.7, 0.5)  # T1ce jitter = 0.7 x T1 jitter + 0.5 x its own (healthy and non-enhancing tissue)

# Per-case share of tumour types: no tumour, a small tumour (a few slices), low-grade-like, high-grade-like.
TUMOUR_KINDS = ("none", "small", "lgg", "hgg")
TUMOUR_KIND_P = (0.10, 0.15, 0.20, 0.55)

# Domains (docs/phantom.md, "Domains"): how far a case's contrasts, imaging, anatomy and tumours vary.
# - "fixed": the contrast table above with the small per-case jitter (the phantom before domain randomisation);
# - "randomised" (the default, for training): every tissue mean of every modality drawn per case (log-normal
#   around the table, a per-modality gamma), wider blur, bias, noise, gain and anatomical deformation, and more
#   varied tumours (multifocal, large oedema); each modality's tissue ordering is kept;
# - "shifted" (held-out evaluation out of distribution): ranges beyond "randomised" (gamma, blur, bias, noise,
#   brain size, rotation, deformation), case seeds from a separate stream (see ``case_seed``);
# - "physics" (for training): as "randomised", but each tissue mean comes from MR signal equations
#   (``_physics_contrast``: per-case tissue T1, T2 and proton density, per-sequence TR/TE/TI from clinical
#   ranges), so the relationships between the modalities vary as they do between scanners, tissue orderings
#   included; case seeds from a third stream.
# A range is (low, high); a list of ranges means: one of them, chosen at random, then uniform inside it.
DOMAINS = ("randomised", "fixed", "shifted", "physics")
GEOMETRY_FIXED = dict(rotation_deg=6.0, zoom=(0.86, 0.95), zoom_axis=(0.97, 1.03), elastic_mm=(1.5, 3.0))
DOMAIN_RANGES = {
    "randomised": dict(
        contrast_sd={"t1": 0.10, "t1ce": 0.10, "t2": 0.15, "flair": 0.10},  # log-sd of each tissue mean
        gamma=(0.8, 1.25), gain=(300.0, 4000.0),
        blur=(0.3, 1.2), bias=(0.04, 0.25), noise=(0.01, 0.05), t1_slice_mm=(2.0, 7.0),
        rotation_deg=10.0, zoom=(0.82, 0.98), zoom_axis=(0.95, 1.05), elastic_mm=(1.5, 5.0),
        kind_p=(0.08, 0.12, 0.20, 0.60), radius_scale=(0.8, 1.3), large_oedema_p=0.3, oedema_scale=(1.2, 1.6),
        multifocal_p=0.2, lesions=(2, 3),
    ),
    "shifted": dict(
        contrast_sd={"t1": 0.2, "t1ce": 0.2, "t2": 0.2, "flair": 0.2},
        gamma=[(0.6, 0.75), (1.35, 1.6)], gain=(300.0, 4000.0),
        blur=(1.2, 1.6), bias=(0.25, 0.35), noise=(0.05, 0.07), t1_slice_mm=(7.0, 8.0),
        rotation_deg=16.0, zoom=[(0.74, 0.80), (0.98, 1.02)], zoom_axis=(0.93, 1.07), elastic_mm=(5.0, 7.0),
        kind_p=(0.05, 0.10, 0.25, 0.60), radius_scale=(0.7, 1.4), large_oedema_p=0.5, oedema_scale=(1.3, 1.8),
        multifocal_p=0.4, lesions=(2, 4),
    ),
}

DOMAIN_RANGES["physics"] = dict(DOMAIN_RANGES["randomised"], contrast_model="physics")

# Tissue relaxation times (ms) and proton densities (relative) for the "physics" domain, each drawn uniformly per
# case (shared/notes/robust_synthesis.md; they vary with field strength and between studies, hence ranges).
# "enhancing_t1_gd": the enhancing tumour's T1 after gadolinium (T1ce only: the enhancing rim is a T1 effect).
TISSUE_RELAXATION = {
    #                T1 (ms)          T2 (ms)          PD
    "csf":          ((3500, 4500), (1500, 2000), (0.97, 1.00)),
    "gm":           ((950, 1800), (80, 110), (0.76, 0.84)),
    "wm":           ((600, 1100), (65, 90), (0.64, 0.71)),
    "oedema":       ((1100, 2000), (140, 260), (0.78, 0.90)),
    "necrosis":     ((2000, 3600), (400, 1200), (0.84, 0.96)),
    "nonenhancing": ((1100, 1700), (100, 170), (0.74, 0.86)),
    "enhancing":    ((1000, 1600), (85, 140), (0.74, 0.86)),
}
ENHANCING_T1_GD = (300, 600)
FIELD_T1_SCALE = (0.9, 1.3)  # every T1 of a case scaled together (1.5 T -> 3 T lengthens T1)
#: Sequence parameters (ms) per modality: spin echo T2w and T1w, inversion recovery for FLAIR and for the 3D
#: MPRAGE-like T1ce (inversion-prepared gradient echo; TE there is T2*-like, a few ms).
SEQUENCES = {
    "t2": dict(tr=(3000, 6000), te=(80, 120)),
    "t1": dict(tr=(400, 700), te=(8, 20)),  # a 2D spin echo, or (T1_GRADIENT_ECHO_P) like T1ce without contrast
    "flair": dict(tr=(8000, 11000), te=(80, 140), ti_null=(0.95, 1.05)),  # TI about CSF's null point, x this
    "t1ce": dict(tr=(1600, 2500), te=(2, 5), ti=(700, 1100)),
}
T1_GRADIENT_ECHO_P = 0.5  # share of cases whose T1 is a 3D inversion-prepared gradient echo (as many BraTS sites)


def _physics_contrast(rng: np.random.Generator) -> dict:
    """A per-case tissue x modality table from MR signal equations (magnitudes; PD relative, times in ms):

    - spin echo (T2w, T1w): ``PD (1 - exp(-TR/T1)) exp(-TE/T2)``;
    - inversion recovery (FLAIR with TI near CSF's null point, and the MPRAGE-like T1ce; T1 too in
      :data:`T1_GRADIENT_ECHO_P` of the cases, with T1ce's sequence and no gadolinium):
      ``PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)``.

    Tissue parameters are drawn from :data:`TISSUE_RELAXATION` (every T1 scaled by one field factor), sequence
    parameters from :data:`SEQUENCES`; the enhancing tumour takes its post-gadolinium T1 in T1ce. Each modality is
    scaled so that its brightest tissue has the brightest value of ``BASE_CONTRAST`` in that modality (the scale
    is arbitrary: the case's gain and the training's intensity scaling follow). No tissue ordering is imposed.
    """
    field = rng.uniform(*FIELD_T1_SCALE)
    params = {t: (rng.uniform(*r1) * field, rng.uniform(*r2), rng.uniform(*r3))
              for t, (r1, r2, r3) in TISSUE_RELAXATION.items()}
    t1_gd = rng.uniform(*ENHANCING_T1_GD) * field
    seq = {m: {k: rng.uniform(*v) for k, v in spec.items()} for m, spec in SEQUENCES.items()}
    csf_t1, flair = params["csf"][0], seq["flair"]  # CSF's null point: 1 - 2 exp(-TI/T1) + exp(-TR/T1) = 0
    flair["ti"] = csf_t1 * np.log(2 / (1 + np.exp(-flair["tr"] / csf_t1))) * flair.pop("ti_null")
    t1_gradient_echo = rng.random() < T1_GRADIENT_ECHO_P

    def spin_echo(t1, t2, pd, s):
        return pd * (1 - np.exp(-s["tr"] / t1)) * np.exp(-s["te"] / t2)

    def inversion(t1, t2, pd, s):
        return pd * abs(1 - 2 * np.exp(-s["ti"] / t1) + np.exp(-s["tr"] / t1)) * np.exp(-s["te"] / t2)

    table = {}
    for tissue, (t1, t2, pd) in params.items():
        t1ce = t1_gd if tissue == "enhancing" else t1
        t1w = inversion(t1, t2, pd, seq["t1ce"]) if t1_gradient_echo else spin_echo(t1, t2, pd, seq["t1"])
        table[tissue] = {"t1": t1w, "t2": spin_echo(t1, t2, pd, seq["t2"]),
                         "flair": inversion(t1, t2, pd, seq["flair"]), "t1ce": inversion(t1ce, t2, pd, seq["t1ce"])}
    for j, mod in enumerate(MODALITIES):
        top = max(table[t][mod] for t in TISSUES)
        base_top = max(BASE_CONTRAST[t][j] for t in TISSUES)
        for t in TISSUES:
            table[t][mod] = float(max(table[t][mod] / top, 0.02) * base_top)  # nulled tissue: a floor, not 0
    return table


# Internal label convention returned by make_case; the writers map it to each layout's convention.
LABEL_NECROSIS, LABEL_OEDEMA, LABEL_ENHANCING = (INTERNAL_LABELS[k] for k in ("necrosis", "edema", "enhancing"))
_SEG_MAP = {  # internal label -> label written in the file, per layout (MSD: 1 oedema, 2 non-enhancing, 3 enhancing)
    layout: np.array([file_label(layout, i) for i in range(1 + len(INTERNAL_LABELS))], np.uint8) for layout in LAYOUTS
}

_COARSE_STEP = 4  # output voxels between nodes of the coarse deformation grid


# ----------------------------------------------------------------------------------------------------------
# Anatomy template (loaded once per process)
# ----------------------------------------------------------------------------------------------------------
def _nilearn_data_dir() -> Path:
    """Folder of nilearn's bundled data files, found without importing nilearn (its import is slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nilearn is not installed; it ships the MNI152 tissue maps the phantom is built from")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


@functools.lru_cache(maxsize=1)
def _template() -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """MNI152 2009 tissue maps as a (1, 3, 197, 233, 189) float32 tensor with channels GM, WM, CSF in [0, 1].

    GM + WM + CSF = 1 inside the brain (T1 > 0) and 0 outside. Also returns the brain's bounding-box centre and
    size in template voxels. The template is RAS, 1 mm.
    """
    folder = _nilearn_data_dir()
    stem = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    t1 = np.asarray(nib.load(folder / stem.format("t1")).dataobj)
    gm = np.asarray(nib.load(folder / stem.format("gm")).dataobj).astype(np.float32) / 255.0
    wm = np.asarray(nib.load(folder / stem.format("wm")).dataobj).astype(np.float32) / 255.0
    brain = t1 > 0  # the template T1 is already brain-extracted
    gm *= brain
    wm *= brain
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    # nibabel returns Fortran-ordered arrays; grid_sample is several times faster on a C-contiguous tensor
    maps = torch.from_numpy(np.ascontiguousarray(np.stack([gm, wm, csf])[None], dtype=np.float32))
    idx = np.argwhere(brain)
    lo, hi = idx.min(0), idx.max(0)
    return maps, (lo + hi) / 2.0, (hi - lo + 1).astype(np.float64)


# Choroid plexus of the right lateral ventricle in MNI world mm (x, y, z) with a radius in mm, from the glomus
# in the atrium forward along the floor of the body towards the foramen of Monro; the left one is mirrored.
CHOROID_PATH = ((26.0, -43.0, 11.0, 4.5), (17.0, -31.0, 18.0, 2.5), (11.0, -16.0, 20.0, 2.0),
                (8.0, -4.0, 15.0, 1.5))
_MNI_ORIGIN = np.array([98.0, 134.0, 72.0])  # template voxel of MNI world (0, 0, 0); the template is 1 mm RAS


@functools.lru_cache(maxsize=1)
def _template_aux() -> torch.Tensor:
    """Template-space helper maps at 2 mm: (1, 2, 99, 117, 95) float32, channels

    0. depth: distance in mm from the brain surface (0 at the edge);
    1. ventricle: 1 in the lateral ventricles (dilated by 2 mm), 0 elsewhere, used to keep vessels out of
       them. Found as the deep (> 10 mm) CSF component that fills the ventricles' bodies.
    """
    maps = _template()[0][0, :, ::2, ::2, ::2].numpy()
    brain = maps.sum(0) > 0.5
    depth = np.maximum(ndimage.distance_transform_edt(brain) * 2.0 - 1.0, 0.0)
    deep_csf = (maps[2] > 0.5) & (depth > 10.0)
    parts, n = ndimage.label(deep_csf)
    # the component with the most voxels where the ventricles' bodies are (|x| 5-20, y -30..-5, z 17-28 mm)
    lo = (_MNI_ORIGIN + np.array([5.0, -30.0, 17.0])) / 2
    hi = (_MNI_ORIGIN + np.array([20.0, -5.0, 28.0])) / 2
    body = parts[int(lo[0]) : int(hi[0]) + 1, int(lo[1]) : int(hi[1]) + 1, int(lo[2]) : int(hi[2]) + 1]
    # the same box in the left hemisphere: x -> -x is template voxel 98 - x, index (98 - x) / 2 = 98 - index
    mirror = parts[int(_MNI_ORIGIN[0] - hi[0]) : int(_MNI_ORIGIN[0] - lo[0]) + 1,
                   int(lo[1]) : int(hi[1]) + 1, int(lo[2]) : int(hi[2]) + 1]
    counts = np.bincount(np.concatenate([body.ravel(), mirror.ravel()]), minlength=n + 1)
    counts[0] = 0
    ventricle = np.isin(parts, np.nonzero(counts > 0.2 * counts.max())[0]) if n else deep_csf
    ventricle = ndimage.binary_dilation(ventricle)
    aux = np.stack([depth, ventricle]).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(aux[None]))


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------
def brats_affine(shape=BRATS_SHAPE) -> np.ndarray:
    """Voxel-to-world affine of real BraTS files (1 mm, x and y flipped), generalised to any grid ``shape``."""
    return np.array(
        [[-1.0, 0, 0, 0], [0, -1.0, 0, shape[1] - 1], [0, 0, 1.0, 0], [0, 0, 0, 1.0]], dtype=np.float64
    )


def case_seed(seed: int, index: int, domain: str = "randomised") -> int:
    """Seed of case ``index`` in a run with base ``seed``; it does not depend on how many cases are made.

    Cases of the ``shifted`` domain draw from a separate stream (``SeedSequence([seed, index, 1])``), so no held-out
    case shares its seed, and so its anatomy and tumour, with a training case of any base seed; ``physics`` cases
    from a third (``[seed, index, 2]``), so that they add anatomy to a training set of ``randomised`` cases.
    """
    words = [int(seed), int(index)] + {"shifted": [1], "physics": [2]}.get(domain, [])
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def _uniform(rng: np.random.Generator, spec, size=None):
    """Uniform draw from ``(low, high)``, or from one of a list of such ranges chosen at random (per value)."""
    if isinstance(spec, tuple):
        return rng.uniform(spec[0], spec[1], size)
    picks = rng.integers(len(spec), size=size)
    lows, highs = np.array([r[0] for r in spec])[picks], np.array([r[1] for r in spec])[picks]
    return lows + (highs - lows) * rng.random(size)


def _upsample(coarse: np.ndarray, size) -> np.ndarray:
    """Trilinear upsampling of a (C, a, b, c) float array to (C, *size), corners aligned."""
    t = torch.from_numpy(np.ascontiguousarray(coarse, dtype=np.float32))[None]
    return F.interpolate(t, size=tuple(int(s) for s in size), mode="trilinear", align_corners=True)[0].numpy()


def _smooth_noise(rng: np.random.Generator, size, sigma: float, channels: int = 1,
                  points_per_sigma: float = 4.0) -> np.ndarray:
    """Smooth Gaussian random field(s) of shape (channels, *size), zero mean and unit standard deviation.

    ``sigma`` is the correlation length in voxels. The noise is drawn on a grid ``sigma / points_per_sigma``
    apart (at most 1 voxel), smoothed there and upsampled trilinearly, which is much faster than smoothing at
    full resolution.
    """
    step = max(1.0, sigma / points_per_sigma)
    coarse_size = [max(2, int(np.ceil((s - 1) / step)) + 1) for s in size]
    noise = rng.standard_normal((channels, *coarse_size), dtype=np.float32)
    for c in range(channels):
        noise[c] = ndimage.gaussian_filter(noise[c], sigma / step, mode="reflect", truncate=3.0)
        noise[c] -= noise[c].mean()
        noise[c] /= noise[c].std() + 1e-8
    return _upsample(noise, size)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Random 3x3 rotation with each Euler angle uniform in +-max_deg degrees."""
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Random orthogonal 3x3 matrix, uniform over orientations (QR of a Gaussian matrix)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be three positive integers, got {shape!r}") from None
    if len(shape) != 3 or min(shape) < 24:
        raise ValueError(f"shape must be three integers >= 24, got {shape!r}")
    return shape


# ----------------------------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------------------------
def _draw_tumour(rng: np.random.Generator, ranges: dict | None = None) -> dict:
    """Tumour type and sizes (template millimetres) for one case; independent of the grid shape.

    With a domain's ``ranges``: its shares of the kinds, a random size scale, sometimes a large oedema (the whole
    tumour radius scaled up) and sometimes more lesions (``lesions`` = their number, satellites made smaller).
    """
    kind_p = TUMOUR_KIND_P if ranges is None else ranges["kind_p"]
    kind = TUMOUR_KINDS[rng.choice(len(TUMOUR_KINDS), p=kind_p)]
    enhancing = kind == "hgg" or (kind == "small" and rng.random() < 0.5)
    if kind == "small":  # a nodule that shows on a few slices only
        r_wt = rng.uniform(4.0, 9.0)
        r_tc = r_wt * rng.uniform(0.35, 0.6)
    elif kind == "lgg":  # mostly non-enhancing solid tumour with a thin oedema margin
        r_wt = rng.uniform(14.0, 30.0)
        r_tc = r_wt * rng.uniform(0.55, 0.85)
    else:  # hgg (and "none", whose sizes are not used)
        r_wt = rng.uniform(18.0, 36.0)
        r_tc = r_wt * rng.uniform(0.45, 0.7)
    r_nec = r_tc * rng.uniform(0.45, 0.75) if enhancing else 0.0
    mass_effect = rng.uniform(0.25, 0.45) if kind in ("lgg", "hgg") else 0.0
    lesions = 1
    if ranges is not None:
        scale = _uniform(rng, ranges["radius_scale"])
        r_wt, r_tc, r_nec = r_wt * scale, r_tc * scale, r_nec * scale
        if rng.random() < ranges["large_oedema_p"]:
            r_wt *= _uniform(rng, ranges["oedema_scale"])
        if kind in ("lgg", "hgg") and rng.random() < ranges["multifocal_p"]:
            lesions = int(rng.integers(ranges["lesions"][0], ranges["lesions"][1] + 1))
    return dict(kind=kind, enhancing=enhancing, r_wt=r_wt, r_tc=r_tc, r_nec=r_nec, mass_effect=mass_effect,
                lesions=lesions)


def _domain_contrast(rng: np.random.Generator, ranges: dict) -> dict:
    """A per-case tissue x modality table for a randomised domain; each modality keeps the tissue ordering of
    ``BASE_CONTRAST``.

    Each mean is the table's value times ``exp(N(0, contrast_sd))`` (a tissue's T1ce factor mostly follows its T1
    factor, as in the fixed jitter); the drawn values of a modality are then handed out to the tissues in the
    table's order (the smallest to the darkest tissue, and so on), and a per-modality gamma is applied relative
    to the brightest tissue. Both steps keep the order; tissues of equal table value may come out either way.
    """
    base = np.array([BASE_CONTRAST[t] for t in TISSUES])  # (tissues, modalities)
    sd = np.array([ranges["contrast_sd"][m] for m in MODALITIES])
    eps = rng.standard_normal(base.shape) * sd
    t1, t1ce = MODALITIES.index("t1"), MODALITIES.index("t1ce")
    shared = [i for i, t in enumerate(TISSUES) if t != "enhancing"]
    eps[shared, t1ce] = T1CE_JITTER_MIX[0] * eps[shared, t1] + T1CE_JITTER_MIX[1] * eps[shared, t1ce]
    drawn = base * np.exp(eps)
    table = np.empty_like(base)
    for j in range(len(MODALITIES)):
        order = np.argsort(base[:, j], kind="stable")
        table[order, j] = np.sort(drawn[:, j])
        top = table[:, j].max()
        table[:, j] = top * (table[:, j] / top) ** _uniform(rng, ranges["gamma"])
    return {t: {m: float(table[i, j]) for j, m in enumerate(MODALITIES)} for i, t in enumerate(TISSUES)}


def _randomise_imaging(rng: np.random.Generator, ranges: dict, look: dict, pair: dict) -> None:
    """Replace the contrast table and the imaging parameters of ``look`` and ``pair`` by a domain's draws."""
    n = len(MODALITIES)
    physics = ranges.get("contrast_model") == "physics"
    look["contrast"] = _physics_contrast(rng) if physics else _domain_contrast(rng, ranges)
    look["blur_sigma"] = _uniform(rng, ranges["blur"], n)
    look["bias_amp"] = _uniform(rng, ranges["bias"], n)
    look["noise_sd"] = _uniform(rng, ranges["noise"], n)
    look["gain"] = _uniform(rng, ranges["gain"], n)
    pair["t1_slice_mm"] = _uniform(rng, ranges["t1_slice_mm"])
    pair["t1_noise_sd"] = _uniform(rng, ranges["noise"])
    pair["t1ce_noise_sd"] = _uniform(rng, ranges["noise"]) * 0.6  # the 3D T1ce stays the least noisy
    pair["t1ce_blur"] = _uniform(rng, ranges["blur"]) * 0.6


def _draw_appearance(rng: np.random.Generator) -> dict:
    """Per-case contrast table and per-modality imaging parameters; independent of the grid shape."""
    jitter = np.clip(rng.normal(0.0, CONTRAST_JITTER, (len(TISSUES), len(MODALITIES))),
                     -CONTRAST_JITTER_CLIP, CONTRAST_JITTER_CLIP)
    # a tissue's T1 varies between patients the same way in both T1-weighted scans: the T1ce jitter is mostly
    # the T1 jitter (correlation 0.8), so the GM/WM and CSF/WM differences between T1 and T1ce outlast the
    # jitter; the enhancing tumour's T1ce (the gadolinium uptake) keeps its own
    t1, t1ce = MODALITIES.index("t1"), MODALITIES.index("t1ce")
    shared = [i for i, t in enumerate(TISSUES) if t != "enhancing"]
    mixed = T1CE_JITTER_MIX[0] * jitter[shared, t1] + T1CE_JITTER_MIX[1] * jitter[shared, t1ce]
    jitter[shared, t1ce] = np.clip(mixed, -CONTRAST_JITTER_CLIP, CONTRAST_JITTER_CLIP)
    contrast = {t: {mod: float(BASE_CONTRAST[t][j] * (1 + jitter[i, j])) for j, mod in enumerate(MODALITIES)}
                for i, t in enumerate(TISSUES)}
    n = len(MODALITIES)
    return dict(
        contrast=contrast,
        texture_amp=rng.uniform(0.015, 0.03, n),  # fine tissue texture, relative
        tumour_hetero_amp=rng.uniform(0.04, 0.08, n),  # extra heterogeneity inside the tumour, relative
        tumour_hetero_angle=rng.uniform(0, 2 * np.pi, n),  # mix of the two heterogeneity fields
        blur_sigma=rng.uniform(0.3, 0.8, n),  # partial-volume / point-spread blur, voxels
        bias_amp=rng.uniform(0.04, 0.12, n),  # log-amplitude of the bias field
        bias_angle=rng.uniform(0, 2 * np.pi, n),  # mix of the two bias fields
        noise_sd=rng.uniform(0.012, 0.03, n),  # Rician noise, relative to WM in T1
        gain=rng.uniform(1000.0, 2500.0, n),  # scanner units per contrast unit
    )


def _draw_t1_pair(rng: np.random.Generator) -> dict:
    """Per-case parameters that make T1 and T1ce differ outside the tumour; independent of the grid shape.

    T1 is a 2D spin echo with thick axial slices (through-plane blur, more noise); T1ce is a high-resolution
    3D gradient echo (little blur, less noise) in which contrast agent also shows in vessels, the choroid
    plexus and, in some cases, the dura.
    """
    return dict(
        t1_slice_mm=rng.uniform(3.0, 6.0),  # T1 slice thickness: through-plane blur FWHM, mm
        t1_noise_sd=rng.uniform(0.025, 0.04),  # Rician noise relative to WM
        t1ce_noise_sd=rng.uniform(0.012, 0.022),
        t1ce_blur=rng.uniform(0.3, 0.5),  # voxels, isotropic
        vessel_value=rng.uniform(1.15, 1.45),  # enhancing vessel lumen, relative to WM in T1ce
        vessel_radius_mm=rng.uniform(0.7, 1.1),
        vessel_density=rng.uniform(0.55, 0.85),  # share of the vessel network that is present
        choroid_value=rng.uniform(1.0, 1.3),
        choroid_scale=rng.uniform(0.8, 1.25),  # radius scale of the choroid plexus
        choroid_shift=rng.normal(0.0, 1.5, (2, 3)),  # per hemisphere, mm
        dura_value=rng.uniform(0.9, 1.2),
        dura_fraction=rng.uniform(0.3, 0.7) if rng.random() < 0.7 else 0.0,  # share of the edge voxel
    )


def _choroid(pair: dict, full_t: np.ndarray, coarse_t: np.ndarray, csf: np.ndarray, step: int):
    """Choroid plexus partial volume inside the lateral ventricles, computed in a box around it only.

    ``full_t``: template voxel coordinates of every crop voxel (3, *crop); ``coarse_t`` the same on the
    coarse nodes that ``full_t`` was upsampled from. Returns (fraction over the box, box slices) or None.
    """
    path = np.array(CHOROID_PATH)
    radius = path[:, 3] * pair["choroid_scale"]
    hemispheres = []
    for side, shift in zip((1.0, -1.0), pair["choroid_shift"]):
        hemispheres.append(_MNI_ORIGIN + path[:, :3] * [side, 1.0, 1.0] + shift)  # template voxels
    points = np.concatenate(hemispheres)
    margin = radius.max() + 3.0
    near = np.all((coarse_t >= (points.min(0) - margin)[:, None, None, None] - step) &
                  (coarse_t <= (points.max(0) + margin)[:, None, None, None] + step), axis=0)
    if not near.any():
        return None
    idx = np.argwhere(near)
    lo, hi = idx.min(0) * step, np.minimum((idx.max(0) + 1) * step + 1, full_t.shape[1:])
    box = tuple(slice(int(a), int(z)) for a, z in zip(lo, hi))
    p = full_t[(slice(None), *box)]
    frac = np.zeros(p.shape[1:], np.float32)
    for pts in hemispheres:
        for a, b, ra, rb in zip(pts[:-1], pts[1:], radius[:-1], radius[1:]):
            ab = (b - a).astype(np.float32)
            rel = p - a.astype(np.float32)[:, None, None, None]
            t = np.clip(np.einsum("i,i...->...", ab, rel) / float(ab @ ab), 0.0, 1.0)
            dist = np.sqrt(((rel - t * ab[:, None, None, None]) ** 2).sum(0))
            np.maximum(frac, _sigmoid((ra + t * (rb - ra) - dist) / 0.5), out=frac)  # template mm
    # the plexus floats in ventricular CSF: keep it where the voxel is mostly CSF
    frac *= np.clip((csf[box] - 0.4) / 0.4, 0.0, 1.0)
    return frac, box


def _uptake(rng, pair, brain, csf, aux, healthy, choroid, mm_per_template_mm, fit):
    """Partial volume of contrast-enhancing non-tumour tissue in each crop voxel and its T1ce signal / WM.

    - Vessels: thin tubes where two smooth random fields are both near zero (the intersection of two random
      surfaces is a random network of curves), gated by a third field into separate segments, kept to the
      CSF spaces outside the ventricles (sulci, fissures, cisterns) and a thin band at the brain surface.
    - Choroid plexus: from ``_choroid`` (glomus in the atrium and a strand along the ventricle body).
    - Dura: patches of the outermost brain voxel, in some cases.
    Nothing is added where the tumour replaced the tissue. Returns two float32 arrays over the crop.
    """
    from scipy.special import ndtri

    # where vessels may run: CSF spaces outside the lateral ventricles and a ~3.5 mm band under the surface
    depth = aux[0][brain] * mm_per_template_mm  # mm below the brain surface
    csf_space = np.clip((csf[brain] - 0.1) / 0.3, 0.0, 1.0) * (1.0 - np.clip(aux[1][brain], 0.0, 1.0))
    region = np.zeros(brain.shape, np.float32)
    region[brain] = np.maximum(_sigmoid((3.5 - depth) / 0.7), csf_space)
    edge = brain & ~ndimage.binary_erosion(brain, border_value=0)  # the outermost brain voxels
    where = (region > 0.01) | edge  # only these voxels can take up contrast (besides the choroid plexus)

    corr = max(2.8 * fit, 2.0)  # correlation length of the vessel fields, voxels
    radius = max(pair["vessel_radius_mm"] * fit, 0.45)  # tube radius, voxels (at least about half a voxel)
    fields = _smooth_noise(rng, brain.shape, sigma=corr, channels=3, points_per_sigma=2)[:, where]
    # near a zero crossing a unit field changes by about 1 / corr per voxel, so |f| < radius / corr on the tube:
    # rho is roughly the distance from the tube's axis in radii; the lumen is full up to rho = 1, with a soft wall
    rho = np.sqrt(fields[0] ** 2 + fields[1] ** 2) * (corr / radius)
    vessel = _sigmoid((1.0 - rho) * radius / 0.35)
    vessel *= _sigmoid((fields[2] - ndtri(1.0 - pair["vessel_density"])) / 0.15)  # segments, not a network
    vessel *= region[where]
    dura = edge[where] * pair["dura_fraction"] * _sigmoid((fields[1] - 0.3) / 0.3)  # in patches

    uptake = np.zeros(brain.shape, np.float32)
    value = np.zeros(brain.shape, np.float32)
    uptake[where] = vessel + dura
    value[where] = vessel * pair["vessel_value"] + dura * pair["dura_value"]
    if choroid is not None:
        frac, box = choroid
        frac = frac * brain[box]
        uptake[box] += frac
        value[box] += frac * pair["choroid_value"]
    scale = np.where(uptake > 1.0, 1.0 / np.maximum(uptake, 1e-6), 1.0) * np.clip(healthy, 0.0, 1.0)
    return (uptake * scale).astype(np.float32), (value * scale).astype(np.float32)


def make_case(seed: int, shape=BRATS_SHAPE, domain: str = "randomised") -> dict:
    """Generate one phantom case in memory.

    Args:
        seed: non-negative integer; the same seed always gives the same arrays. The tumour type and sizes and
            the contrast table depend on the seed only, not on ``shape``.
        shape: output grid (X, Y, Z), array axes pointing left, posterior, superior like BraTS (see
            ``brats_affine``). For the default 240x240x155 one voxel is 1 mm; for other shapes the brain is
            scaled isotropically to fit the grid.
        domain: "randomised" (default), "fixed" or "shifted": how far contrasts, imaging, anatomy and tumours vary
            (``DOMAINS``; docs/phantom.md). "fixed" gives exactly the cases of the phantom before randomisation.

    Returns:
        dict with
        - ``t1``, ``t1ce``, ``t2``, ``flair``: float32 (X, Y, Z) in scanner-like units (brain values roughly
          100-5000, always >= 1 inside the brain), exactly 0 outside the brain.
        - ``label``: uint8 (X, Y, Z), 0 background/healthy, 1 necrosis or non-enhancing core, 2 oedema,
          3 enhancing tumour.
        - ``gm``, ``wm``, ``csf``: float32 (X, Y, Z) healthy-tissue partial volumes (sum 1 inside the brain,
          0 outside), before the tumour replaced tissue.
        - ``brain``: bool (X, Y, Z) brain mask (where the images are non-zero).
        - ``uptake``: float32 (X, Y, Z) fraction of each voxel holding contrast-enhancing non-tumour tissue
          (vessels, choroid plexus, dura), shown in T1ce only; 0 outside the brain and where tumour is.
        - ``kind``: "none", "small", "lgg" or "hgg"; ``lesions``: how many tumour foci (0 without tumour, more than
          1 for a multifocal tumour); ``contrast``: the jittered tissue x modality means used
          (dict tissue -> dict modality -> float, WM in T1 = 1 before the per-modality gain).

    Raises:
        ValueError: negative seed, a bad shape or an unknown domain.
    """
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    shape = _check_shape(shape)
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid domains are: {', '.join(DOMAINS)}")
    ranges = DOMAIN_RANGES.get(domain)  # None for "fixed"
    # four independent random streams, so that e.g. the grid size does not change the tumour type (the fourth,
    # for what makes T1 and T1ce differ, leaves the first three, and so T2 and FLAIR, as they were before it)
    # (a fifth stream draws the domain randomisation; spawning it leaves the first four as they were)
    rng_geo, rng_tum, rng_img, rng_pair, rng_dom = (np.random.default_rng(s)
                                                    for s in np.random.SeedSequence(int(seed)).spawn(5))
    tumour = _draw_tumour(rng_tum) if ranges is None else _draw_tumour(rng_dom, ranges)
    look = _draw_appearance(rng_img)
    pair = _draw_t1_pair(rng_pair)
    if ranges is not None:
        _randomise_imaging(rng_dom, ranges, look, pair)
    geo = GEOMETRY_FIXED if ranges is None else ranges
    contrast = look["contrast"]
    maps, t_center, t_extent = _template()
    fit = min(s / b for s, b in zip(shape, BRATS_SHAPE))  # output voxels per BraTS millimetre

    # --- random geometry: output voxel x -> template voxel M @ (x + displacement(x)) + b -----------------
    zoom = _uniform(rng_geo, geo["zoom"]) * _uniform(rng_geo, geo["zoom_axis"], 3) * fit  # output voxels per template mm
    flip = np.diag([-1.0, -1.0, 1.0])  # BraTS arrays run left/posterior/superior, the template right/anterior
    m = flip @ _rotation(rng_geo, geo["rotation_deg"]) @ np.diag(1.0 / zoom)
    # brain centred in x and y; in z its top sits a few voxels below the last slice, like BraTS (where the
    # lower brainstem, not the vertex, is cut off)
    o_center = (np.array(shape) - 1) / 2.0 + rng_geo.uniform(-4, 4, 3) * fit
    o_center[2] = (shape[2] - 1) - (rng_geo.uniform(6, 12) + 0.5 * t_extent[2] * zoom[2] / fit) * fit
    b = t_center - m @ o_center

    # coarse grid of nodes _COARSE_STEP voxels apart, covering the whole output grid
    step = _COARSE_STEP
    n_nodes = [int(np.ceil((s - 1) / step)) + 1 for s in shape]
    nodes = np.stack(np.meshgrid(*[np.arange(n) * float(step) for n in n_nodes], indexing="ij"))  # (3, ...)
    # elastic displacement in output voxels: smooth field with ~20 mm correlation, a few mm amplitude
    amplitude = _uniform(rng_geo, geo["elastic_mm"]) * fit
    elastic = _smooth_noise(rng_geo, n_nodes, sigma=20.0 * fit / step, channels=3) * amplitude

    def to_template(disp):
        return np.einsum("ij,j...->i...", m, nodes + disp) + b[:, None, None, None]

    coarse_maps = _sample(maps, to_template(elastic))  # (3, *n_nodes)
    coarse_brain = coarse_maps.sum(0)

    # --- tumour centre (chosen on the coarse grid) and mass effect ------------------------------------------
    disp = elastic
    if tumour["kind"] != "none":
        for key in ("r_wt", "r_tc", "r_nec"):  # template mm -> output voxels
            tumour[key] *= zoom.mean()
        tumour["min_rim"] = 2.0 * zoom.mean()  # thinnest enhancing rim, output voxels
        center = _pick_centre(rng_tum, coarse_maps, coarse_brain, nodes, to_template(elastic),
                              tumour["r_tc"] / step)
        tumour["center"] = center
        # further lesions (multifocal): smaller, each at its own place, no mass effect of their own
        tumour["satellites"] = []
        for _ in range(tumour["lesions"] - 1):
            sat = dict(tumour, **{k: tumour[k] * rng_dom.uniform(0.4, 0.8) for k in ("r_wt", "r_tc", "r_nec")})
            sat["center"] = _pick_centre(rng_dom, coarse_maps, coarse_brain, nodes, to_template(elastic),
                                         sat["r_tc"] / step)
            tumour["satellites"].append(sat)
        if tumour["mass_effect"] > 0:
            # sample the template closer to the centre, which pushes the anatomy outwards
            rel = nodes - center[:, None, None, None]
            weight = np.exp(-(rel**2).sum(0) / (2 * (1.2 * tumour["r_tc"]) ** 2))
            disp = elastic - tumour["mass_effect"] * rel * weight

    # --- crop: only the part of the grid that holds brain is sampled at full resolution ------------------
    inside = np.argwhere(coarse_brain > 1e-3)
    lo_node = np.maximum(inside.min(0) - 1, 0)
    hi_node = np.minimum(inside.max(0) + 1, np.array(n_nodes) - 1)
    lo = lo_node * step
    hi = np.minimum(hi_node * step, np.array(shape) - 1)  # inclusive
    crop = tuple(slice(int(a), int(z) + 1) for a, z in zip(lo, hi))
    coarse_t = to_template(disp)[:, lo_node[0] : hi_node[0] + 1, lo_node[1] : hi_node[1] + 1,
                                 lo_node[2] : hi_node[2] + 1]
    # the depth / ventricle helper maps are smooth: sampled on the nodes and upsampled with the coordinates
    coarse_aux = _sample(_template_aux(), coarse_t / 2.0)
    full_t = _upsample(np.concatenate([coarse_t, coarse_aux]), (hi_node - lo_node) * step + 1)
    crop_size = hi - lo + 1
    full_t = full_t[:, : crop_size[0], : crop_size[1], : crop_size[2]]  # exact for the affine part
    full_t, full_aux = full_t[:3], full_t[3:]
    gm, wm, csf = _sample(maps, full_t)
    total = gm + wm + csf
    brain = total > 0.5
    norm = np.where(brain, 1.0 / np.maximum(total, 1e-6), 0.0).astype(np.float32)
    gm, wm, csf = gm * norm, wm * norm, csf * norm
    choroid = _choroid(pair, full_t, coarse_t, csf, step)
    del full_t

    # --- tumour compartments as partial volumes (fractions of each voxel, inside a box around it) -----------
    frac, tumour_noise, box = {}, None, None
    if tumour["kind"] != "none":
        lesions = [_tumour_fractions(rng_tum, tumour, lo, crop_size, wm, csf)]
        lesions += [_tumour_fractions(rng_dom, sat, lo, crop_size, wm, csf) for sat in tumour["satellites"]]
        frac, tumour_noise, box = _merge_lesions(lesions)
    healthy = np.ones_like(gm)  # fraction of each voxel still holding healthy tissue
    for f in frac.values():
        healthy[box] -= f

    # --- contrast uptake outside the tumour, shown in T1ce only: vessels, choroid plexus, dura -------------
    uptake, uptake_signal = _uptake(rng_pair, pair, brain, csf, full_aux, healthy, choroid,
                                    zoom.mean() / fit, fit)
    del full_aux
    uptake_signal *= contrast["wm"]["t1ce"]

    # --- signal per modality: tissue mix, blur, texture, bias, Rician noise, gain ----------------------------
    # the texture and bias fields are smooth, so they are applied after the blur and only to brain voxels
    texture = _smooth_noise(rng_img, crop_size, sigma=3.0 * fit + 1.0, points_per_sigma=2)[0][brain]
    # two smooth random fields; each modality's bias field is a random mix of them (cheaper than four)
    bias = _smooth_noise(rng_img, crop_size, sigma=60.0 * fit, channels=2)[:, brain]
    out = {}
    for j, mod in enumerate(MODALITIES):
        signal = gm * contrast["gm"][mod] + wm * contrast["wm"][mod] + csf * contrast["csf"][mod]
        if frac:
            tum = sum(f * contrast[t][mod] for t, f in frac.items())
            # tumours are more heterogeneous than normal tissue
            angle = look["tumour_hetero_angle"][j]
            tum *= 1.0 + look["tumour_hetero_amp"][j] * (np.cos(angle) * tumour_noise[0] +
                                                         np.sin(angle) * tumour_noise[1])
            signal[box] *= healthy[box]  # healthy == 1 outside the box
            signal[box] += tum
        blur = look["blur_sigma"][j]
        if mod == "t1":  # thick axial slices: the slice profile (FWHM = thickness) blurs along z
            blur = (blur, blur, max(blur, pair["t1_slice_mm"] * fit / 2.355))
        elif mod == "t1ce":  # high-resolution 3D acquisition with enhancing vessels, choroid plexus, dura
            blur = pair["t1ce_blur"]
            signal *= 1.0 - uptake
            signal += uptake_signal
        signal = ndimage.gaussian_filter(signal, blur, truncate=3.0)
        vals = signal[brain]
        angle = look["bias_angle"][j]
        vals *= 1.0 + look["texture_amp"][j] * texture
        vals *= np.exp(look["bias_amp"][j] * (np.cos(angle) * bias[0] + np.sin(angle) * bias[1]))
        # Rician noise: magnitude of the signal plus complex Gaussian noise, drawn for brain voxels only
        n1 = rng_img.standard_normal(vals.shape, dtype=np.float32)
        n2 = rng_img.standard_normal(vals.shape, dtype=np.float32)
        sd = {"t1": pair["t1_noise_sd"], "t1ce": pair["t1ce_noise_sd"]}.get(mod, look["noise_sd"][j])
        vals = np.sqrt((vals + sd * n1) ** 2 + (sd * n2) ** 2)
        image = np.zeros(shape, np.float32)
        image[crop][brain] = np.maximum(vals * look["gain"][j], 1.0)  # brain >= 1, background exactly 0
        out[mod] = image

    # --- labels: the largest compartment in each brain voxel -------------------------------------------------
    label = np.zeros(shape, np.uint8)
    if frac:
        zeros = np.zeros_like(healthy[box])
        core = frac.get("necrosis", zeros) + frac.get("nonenhancing", zeros)
        parts = np.stack([healthy[box], core, frac["oedema"], frac.get("enhancing", zeros)])
        lab = parts.argmax(0).astype(np.uint8)  # 0 healthy, 1 necrosis/core, 2 oedema, 3 enhancing
        lab[~brain[box]] = 0
        label[crop][box] = lab

    for name, arr in (("gm", gm), ("wm", wm), ("csf", csf), ("brain", brain), ("uptake", uptake)):
        full = np.zeros(shape, arr.dtype)
        full[crop] = arr
        out[name] = full
    out["label"] = label
    out["kind"] = tumour["kind"]
    out["lesions"] = tumour["lesions"] if tumour["kind"] != "none" else 0
    out["contrast"] = contrast
    return out


def _merge_lesions(lesions: list) -> tuple:
    """One (fractions, heterogeneity, box) from several lesions' ``_tumour_fractions``: the union box, each
    compartment the largest of the lesions' fractions, scaled down where the compartments would exceed the voxel."""
    if len(lesions) == 1:
        return lesions[0]
    lo = np.min([[s.start for s in box] for _, _, box in lesions], axis=0)
    hi = np.max([[s.stop for s in box] for _, _, box in lesions], axis=0)
    size = tuple(int(v) for v in hi - lo)
    frac = {k: np.zeros(size, np.float32) for f, _, _ in lesions for k in f}
    hetero = np.zeros((2, *size), np.float32)
    for f, h, box in lesions:
        sub = tuple(slice(b.start - a, b.stop - a) for b, a in zip(box, lo))
        for k, v in f.items():
            frac[k][sub] = np.maximum(frac[k][sub], v)
        hetero[(slice(None), *sub)] = h
    total = sum(frac.values())
    scale = np.where(total > 1, 1.0 / np.maximum(total, 1e-6), 1.0).astype(np.float32)
    return {k: v * scale for k, v in frac.items()}, hetero, tuple(slice(int(a), int(z)) for a, z in zip(lo, hi))


def _sample(maps: torch.Tensor, coords: np.ndarray) -> np.ndarray:
    """Trilinear sample of the (1, C, I, J, K) template at template voxel coordinates (3, ...) -> (C, ...)."""
    size = maps.shape[2:]
    # grid_sample wants (x, y, z) = (K, J, I) order, normalised to [-1, 1] over each axis
    grid = np.stack([coords[2] * (2.0 / (size[2] - 1)) - 1, coords[1] * (2.0 / (size[1] - 1)) - 1,
                     coords[0] * (2.0 / (size[0] - 1)) - 1], axis=-1).astype(np.float32)
    out = F.grid_sample(maps, torch.from_numpy(grid)[None], mode="bilinear", padding_mode="zeros",
                        align_corners=True)
    return out[0].numpy()


def _pick_centre(rng, coarse_maps, coarse_brain, nodes, coarse_template, min_depth_nodes) -> np.ndarray:
    """A random tumour centre (output voxel coordinates) in the cerebrum, away from ventricles and the surface."""
    gm, wm, csf = coarse_maps
    depth = ndimage.distance_transform_edt(coarse_brain > 0.5)  # in coarse nodes
    # cerebrum: above the template's z = -10 mm plane (template voxel 62), where gliomas mostly arise
    ok = (coarse_brain > 0.9) & (wm > 0.5) & (csf < 0.2) & (coarse_template[2] > 62)
    for need in (max(min_depth_nodes, 2.0), 2.0, 1.0, 0.0):
        cand = np.argwhere(ok & (depth >= need))
        if len(cand):
            break
    else:  # degenerate grid: fall back to any brain node
        cand = np.argwhere(coarse_brain > 0.5)
    node = cand[rng.integers(len(cand))]
    return nodes[(slice(None), *node)] + rng.uniform(-2, 2, 3)


def _tumour_fractions(rng, tumour, crop_lo, crop_size, wm, csf):
    """Partial volumes of oedema, necrosis, non-enhancing core and enhancing tumour in a box around the tumour.

    Returns:
        fractions: {"oedema", and "necrosis" + "enhancing" or "nonenhancing"} float32 arrays over the box;
        two smooth heterogeneity noise fields (2, *box size); the box as a tuple of slices into the crop.
    """
    c = tumour["center"] - crop_lo  # centre in crop coordinates
    r_wt, r_tc, r_nec = tumour["r_wt"], tumour["r_tc"], tumour["r_nec"]
    # ellipsoidal radius r with random axes and orientation: r = |diag(1/axes) @ rot @ (x - c)|
    axes = rng.uniform(0.8, 1.25, 3)
    axes /= np.prod(axes) ** (1 / 3)
    rot = _random_rotation(rng).astype(np.float32)
    # the noisy oedema boundary below lies at r <= 1.65 r_wt; that ellipsoid's half-extent along output axis d
    # is 1.65 r_wt * |column d of diag(axes) @ rot|, plus a margin for the soft edge
    half = (1.65 * r_wt) * np.sqrt(((axes[:, None] * rot) ** 2).sum(0)) + 4
    lo = np.maximum(np.floor(c - half).astype(int), 0)
    hi = np.minimum(np.ceil(c + half).astype(int) + 1, crop_size)
    box = tuple(slice(int(a), int(z)) for a, z in zip(lo, hi))
    size = hi - lo
    grids = np.meshgrid(*[np.arange(a, z, dtype=np.float32) for a, z in zip(lo, hi)], indexing="ij")
    rel = np.stack([g - ci for g, ci in zip(grids, c)])
    r = np.sqrt((np.einsum("ij,j...->i...", rot, rel) ** 2 / (axes[:, None, None, None] ** 2)).sum(0))
    # irregular boundaries: smooth noise at two scales
    coarse = np.clip(_smooth_noise(rng, size, sigma=max(0.35 * r_wt, 1.5), channels=3), -2, 2)
    fine = np.clip(_smooth_noise(rng, size, sigma=max(0.12 * r_wt, 1.0), channels=3), -2, 2)
    tau, tau_oedema = 0.7, 1.2  # widths of the soft boundaries in voxels; oedema fades out more gradually

    # profiles: positive inside, zero on the boundary, in voxels (so the sigmoid gives a ~1 voxel ramp)
    wm_box, csf_box = wm[box], csf[box]
    # oedema spreads further along white matter: its profile is raised in WM and lowered elsewhere
    f_wt = r_wt * (1 - r / r_wt + 0.2 * coarse[0] + 0.06 * fine[0] + 0.25 * (wm_box - 0.5))
    f_tc = r_tc * (1 - r / r_tc + 0.22 * coarse[1] + 0.08 * fine[1])
    s_wt = _sigmoid(f_wt / tau_oedema)
    s_tc = np.minimum(_sigmoid(f_tc / tau), s_wt)
    oedema = (s_wt - s_tc) * (1 - csf_box)  # oedema stays in brain tissue, CSF spaces stay CSF
    frac = {"oedema": oedema.astype(np.float32)}
    if tumour["enhancing"]:
        # a ragged necrosis boundary gives an enhancing rim of varying thickness
        f_n = r_nec * (1 - r / r_nec + 0.25 * coarse[2] + 0.15 * fine[2])
        # keep the necrosis at least ~2 mm inside the core boundary, so the enhancing rim is closed
        s_n = np.minimum(_sigmoid(f_n / tau), _sigmoid((f_tc - tumour["min_rim"]) / tau))
        s_n = np.minimum(s_n, s_tc)
        frac["enhancing"] = (s_tc - s_n).astype(np.float32)
        frac["necrosis"] = s_n.astype(np.float32)
    else:
        frac["nonenhancing"] = s_tc.astype(np.float32)
    hetero = _smooth_noise(rng, size, sigma=2.0, channels=2)
    return frac, hetero, box


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------
def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI-1 file with the affine in both qform and sform, units mm (gzip level 1, nibabel's default)."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    write_atomic(str(path), img.to_filename)


def _to_int16(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)


def _write_case(case: dict, index: int, output_dir: Path, layout: str, affine: np.ndarray) -> str:
    """Write one case in ``layout``; returns its case id (folder relative to output_dir, or the MSD file stem)."""
    seg = _SEG_MAP[layout][case["label"]]
    images = {mod: _to_int16(case[mod]) for mod in MODALITIES}
    if layout == "msd":
        case_id = f"BRATS_{index + 1:03d}"
        stack = np.stack([images[c] for c in CHANNELS], axis=-1)
        _save(stack, affine, output_dir / "imagesTr" / f"{case_id}.nii.gz")
        _save(seg, affine, output_dir / "labelsTr" / f"{case_id}.nii.gz")
        return case_id
    if layout == "brats2021":
        case_id = f"BraTS2021_{index:05d}"
    elif layout == "brats2018":
        grade = "HGG" if (case["label"] == LABEL_ENHANCING).any() else "LGG"
        case_id = f"{grade}/Brats18_PH_{index:05d}_1"
    else:  # brats2023
        case_id = f"BraTS-GLI-{index:05d}-000"
    folder, stem, suffixes = output_dir / case_id, Path(case_id).name, FILE_SUFFIXES[layout]
    for mod in MODALITIES:
        _save(images[mod], affine, folder / f"{stem}{suffixes[mod]}.nii.gz")
    _save(seg, affine, folder / f"{stem}{suffixes['seg']}.nii.gz")
    return case_id


def _write_msd_json(output_dir: Path, case_ids: list[str]) -> None:
    """dataset.json in the style of the Medical Segmentation Decathlon's Task01_BrainTumour."""
    meta = {
        "name": "BRATS",
        "description": "BraTS-like synthetic phantom (brainsynth scripts/phantom.py) in MSD Task01 layout",
        "reference": "synthetic; anatomy from the MNI152 2009 template shipped with nilearn",
        "licence": "CC-BY-SA 4.0",
        "release": "1.0",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": len(case_ids),
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in case_ids],
        "test": [],
    }
    write_json(str(output_dir / "dataset.json"), meta, newline=True, indent=4)


#: What a phantom run writes besides its case folders (the record of the run, the datalists built on it).
RUN_RECORD = "phantom.json"
#: Names of the cases and files any phantom run may have written, per layout (for runs without a record).
_WRITTEN = ("BraTS2021_[0-9][0-9][0-9][0-9][0-9]", "[HL]GG/Brats18_PH_*", "BraTS-GLI-[0-9]*-000",
            "imagesTr/BRATS_[0-9][0-9][0-9].nii.gz", "labelsTr/BRATS_[0-9][0-9][0-9].nii.gz", "dataset.json",
            "datalist*.json", RUN_RECORD)  # fmt: skip


def _clear_earlier_run(output_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that already holds files unless ``overwrite``; with it, remove what an earlier phantom run
    wrote there (its cases, ``dataset.json``, the datalists built on them and its record), nothing else.

    Raises:
        FileExistsError: the folder is not empty and ``overwrite`` is False (the message says what to do).
    """
    import shutil

    entries = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise FileExistsError(
            f"{output_dir} is not empty ({len(entries)} entries: {shown}): give --overwrite true to replace an "
            "earlier phantom set there, or another --output_dir"
        )
    for pattern in _WRITTEN:
        for path in output_dir.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _earlier_record(output_dir: Path) -> dict | None:
    """The record (``phantom.json``) of an earlier phantom run in ``output_dir``, or None."""
    import json

    try:
        return json.loads((output_dir / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None


def _one_thread() -> None:
    """Initializer of :func:`generate`'s worker processes: one torch thread each (the processes share the cores)."""
    import torch

    torch.set_num_threads(1)


def _make_and_write(job: tuple) -> str:
    """One case of :func:`generate` (a picklable job for its worker processes): make case ``i`` and write it."""
    seed, i, shape, domain, output_dir, layout, affine = job
    return _write_case(make_case(case_seed(seed, i, domain), shape, domain), i, output_dir, layout, affine)


def generate(output_dir, num_cases: int = 10, seed: int = 0, layout: str = "brats2021",
             shape=BRATS_SHAPE, overwrite: bool = False, domain: str = "randomised", workers: int = 1) -> list[str]:
    """Generate ``num_cases`` phantom cases and write them under ``output_dir`` in a real dataset layout.

    Args:
        output_dir: folder to write into (created if needed).
        num_cases: number of cases, >= 1. Case i is made from ``case_seed(seed, i)``, so it does not change
            with ``num_cases``.
        seed: base seed, >= 0.
        layout: "brats2021" (default), "brats2018", "brats2023" or "msd"; see bundle/docs/phantom.md.
        shape: grid (X, Y, Z); BraTS is 240x240x155. Accepts a list/tuple or a string like "[240,240,155]".
        overwrite: write into a folder that is not empty, first removing what an earlier phantom run wrote there
            (its cases, ``dataset.json``, ``datalist*.json`` and ``phantom.json``); without it such a folder is
            refused, so that fewer cases never mix with the old ones -- unless it holds exactly the cases asked
            for (its ``phantom.json`` records the same number, seed, layout, shape and domain): then nothing is
            done, so a command can be run again as it is.
        domain: "randomised" (default: domain-randomised contrasts, imaging, anatomy and tumours, for training),
            "fixed" (the narrow phantom before randomisation), "shifted" (held-out cases beyond the randomised
            ranges, from a separate seed stream: an out-of-distribution evaluation set) or "physics" (as
            "randomised", with contrasts from MR signal equations, another seed stream). See docs/phantom.md.
        workers: processes making cases at once (each case is the same whichever process makes it); 0 = one per
            CPU core.

    Returns:
        case ids: folder names relative to ``output_dir`` ("BraTS2021_00000", "HGG/Brats18_PH_00000_1",
        "BraTS-GLI-00000-000") or, for msd, the file stem ("BRATS_001").

    Images are int16 (rounded scanner-like units, brain >= 1, background 0); seg is uint8.

    Raises:
        ValueError: unknown layout or domain, num_cases < 1, negative seed or a bad shape.
        FileExistsError: ``output_dir`` is not empty and ``overwrite`` is False.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid layouts are: {', '.join(LAYOUTS)}")
    if isinstance(num_cases, bool) or not isinstance(num_cases, (int, np.integer)) or num_cases < 1:
        raise ValueError(f"num_cases must be an integer >= 1, got {num_cases!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if isinstance(shape, str):  # e.g. "[240,240,155]" or "240,240,155" from the command line
        shape = [s for s in shape.strip("[]() ").split(",") if s.strip()]
    shape = _check_shape(shape)
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid domains are: {', '.join(DOMAINS)}")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
    workers = min(int(workers) or os.cpu_count() or 1, int(num_cases))

    from tqdm import tqdm

    output_dir = Path(output_dir)
    record = {"num_cases": int(num_cases), "seed": int(seed), "layout": layout, "shape": list(shape),
              "domain": domain}
    earlier = _earlier_record(output_dir)
    if not overwrite and earlier is not None and {k: earlier.get(k) for k in record} == record \
            and all((output_dir / c).exists() or layout == "msd" for c in earlier.get("cases", [])):
        print(f"{output_dir} already holds these {num_cases} cases (seed {seed}, {domain}, {layout}): nothing to do "
              "(--overwrite true makes them anew)")
        return list(earlier["cases"])
    _clear_earlier_run(output_dir, bool(overwrite))
    output_dir.mkdir(parents=True, exist_ok=True)
    affine = brats_affine(shape)
    jobs = [(seed, i, shape, domain, output_dir, layout, affine) for i in range(num_cases)]
    progress = {"desc": f"phantom {layout} {domain}", "unit": "case", "total": num_cases}
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawned, not forked: a fork of a process whose OpenMP threads already ran can hang
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as pool:
            case_ids = list(tqdm(pool.map(_make_and_write, jobs), **progress))
    else:
        case_ids = [_make_and_write(job) for job in tqdm(jobs, **progress)]
    if layout == "msd":
        _write_msd_json(output_dir, case_ids)
    record["cases"] = case_ids
    write_json(str(output_dir / RUN_RECORD), record, newline=True, indent=2)
    return case_ids


def region_means(case: dict, purity: float = 0.9) -> dict:
    """Mean of each modality per region of a ``make_case`` result, for checking and documenting contrasts.

    Regions: "csf", "gm", "wm" are healthy voxels (label 0, and ``uptake`` < 0.01 so no vessel, choroid plexus
    or dura) with that tissue's partial volume >= ``purity``;
    "oedema", "necrosis_or_core", "enhancing" are the label values 2, 1, 3. Returns {region: {modality: mean}};
    regions without voxels are left out.
    """
    label = case["label"]
    healthy = label == 0
    if "uptake" in case:  # leave out the enhancing vessels, choroid plexus and dura
        healthy = healthy & (case["uptake"] < 0.01)
    regions = {t: healthy & (case[t] >= purity) for t in ("csf", "gm", "wm")}
    regions.update({"oedema": label == LABEL_OEDEMA, "necrosis_or_core": label == LABEL_NECROSIS,
                    "enhancing": label == LABEL_ENHANCING})
    return {name: {mod: float(case[mod][mask].mean()) for mod in MODALITIES}
            for name, mask in regions.items() if mask.any()}


def contrast_table(num_cases: int = 20, seed: int = 0, shape=BRATS_SHAPE, domain: str = "fixed") -> str:
    """Markdown table of the region means as generated: mean +- sd over ``num_cases`` cases of ``generate``
    (of the ``fixed`` domain unless ``domain`` says otherwise).

    Label 1 counts as necrosis in cases with an enhancing tumour and as non-enhancing tumour otherwise.
    Each case's means (``region_means``) are normalised like ``BASE_CONTRAST``: T1 and T1ce by that case's WM,
    T2 by its CSF, FLAIR by its oedema (cases without oedema are left out of the FLAIR column). Unlike the
    base table, these values include partial volume, blur, bias field and Rician noise.
    """
    reference = {"t1": "wm", "t1ce": "wm", "t2": "csf", "flair": "oedema"}
    regions = ("csf", "gm", "wm", "oedema", "necrosis", "nonenhancing", "enhancing")
    values = {(r, m): [] for r in regions for m in MODALITIES}
    for i in range(num_cases):
        means = region_means(make_case(case_seed(seed, i, domain), shape, domain))
        # label 1 is necrosis where the tumour enhances, non-enhancing solid tumour where it does not
        if "necrosis_or_core" in means:
            means["necrosis" if "enhancing" in means else "nonenhancing"] = means.pop("necrosis_or_core")
        for r in regions:
            for m in MODALITIES:
                if r in means and reference[m] in means:
                    values[r, m].append(means[r][m] / means[reference[m]][m])
    lines = ["| region | " + " | ".join(MODALITIES) + " |", "|---" * (len(MODALITIES) + 1) + "|"]
    for r in regions:
        cells = [f"{np.mean(v):.2f} ± {np.std(v):.2f}" if (v := values[r, m]) else "–" for m in MODALITIES]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@functools.wraps(generate)  # its options, for --help and for the check of the command line
def main(*args, **kwargs) -> list[str]:
    """Command line: :func:`generate`; a bad option or a folder that is not empty ends in one line, status 1."""
    try:
        return generate(*args, **kwargs)
    except (ValueError, FileExistsError) as e:
        sys.exit(f"phantom.py: {e}")


if __name__ == "__main__":
    from scripts.runtime.command_line import run_tool

    run_tool(generate if "--help" in sys.argv or "-h" in sys.argv else main)

"""Is a volume given as the T2 really a T2? A check from the image itself (issue #15, item 3).

In a T2 the CSF is the brightest tissue: the ventricles near the brain's centre and the sulci at its surface are
bright, white matter is the darkest tissue. In T1, T1ce and FLAIR the CSF is dark. Seven intensity statistics of
the skull-stripped volume (background 0), taken at half resolution, describe this (:func:`t2_features`):

1. log of (97th - median) / (median - 3rd percentile) in a central box of the brain (the ventricles);
2. median of a 2-voxel shell one voxel inside the brain's edge over the median inside it (the sulci);
3. skewness of the brain's intensities;
4. (median - 3rd percentile of the central box) / median;
5. (97th percentile of the central box - median) / median;
6. (95th - median) / (median - 5th percentile) of the brain;
7. (75th - median) / (median - 25th percentile) of the brain.

A logistic regression on them (:data:`CLASSIFIER`) gives the probability that the volume is a T2. It was fitted on
the four modalities of 32 full-size (240x240x155, 1 mm) phantom cases (24 domain-randomised, 8 shifted; seed 0),
and on 16 other randomised cases it gave every T2 a probability >= 0.845 and every T1, T1ce and FLAIR <= 0.009
(``bundle/docs/inference.md``). On 24 unseen *shifted* cases it accepted 23 of 24 T2s and 1 of 24 FLAIRs, so the
check is opt-in (``--check_contrast true``) until one that holds on unseen contrasts and real scans replaces it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Standardisation and logistic-regression weights of the seven features (fitted as the module doc says).
CLASSIFIER = {
    "mean": [0.06753, 0.97279, 0.42962, 0.57621, 0.71447, 1.42748, 1.23375],
    "std": [0.84918, 0.12727, 0.78960, 0.18249, 0.47907, 0.84258, 0.38844],
    "weights": [2.17043, 2.67654, -0.76339, -2.64124, 0.80901, -0.43210, 0.24632],
    "bias": -3.75118,
}


def t2_features(volume) -> np.ndarray:
    """The seven statistics of the module doc for a 3D volume (background 0), as a float64 array.

    Raises:
        ValueError: the volume has too little brain (fewer than 1000 non-zero voxels at half resolution).
    """
    x = np.asarray(volume, dtype=np.float32)[::2, ::2, ::2]
    brain = x > 0
    values = x[brain]
    if values.size < 1000:
        raise ValueError("too little brain to judge its contrast")
    median = float(np.median(values))
    where = np.argwhere(brain)
    lo, hi = where.min(0), where.max(0)
    centre, half = (lo + hi) / 2, (hi - lo) * 0.15
    box = tuple(slice(int(c - h), int(c + h) + 1) for c, h in zip(centre, half))
    central = x[box][brain[box]]
    p97, p3 = np.percentile(central, [97, 3])
    inside = ndimage.binary_erosion(brain)
    deep = ndimage.binary_erosion(inside, iterations=2)
    shell = inside & ~deep
    q5, q25, q75, q95 = np.percentile(values, [5, 25, 75, 95])
    skew = float(((values - values.mean()) ** 3).mean() / values.std() ** 3)
    tiny = 1e-6
    return np.array([
        np.log((p97 - median) / max(median - p3, tiny) + tiny),
        np.median(x[shell]) / np.median(x[deep]) if deep.any() and shell.any() else 1.0,
        skew,
        (median - p3) / median,
        (p97 - median) / median,
        (q95 - median) / max(median - q5, tiny),
        (q75 - median) / max(median - q25, tiny),
    ], dtype=np.float64)  # fmt: skip


def t2_probability(volume) -> float:
    """The classifier's probability that ``volume`` is a T2 (see the module doc)."""
    z = (t2_features(volume) - np.array(CLASSIFIER["mean"])) / np.array(CLASSIFIER["std"])
    return float(1.0 / (1.0 + np.exp(-(z @ np.array(CLASSIFIER["weights"]) + CLASSIFIER["bias"]))))

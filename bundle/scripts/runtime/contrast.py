"""Is a volume given as the T2 really a T2? A check from the image itself (issue #15, item 3).

In a T2 the CSF is the brightest tissue: the ventricles near the brain's centre and the sulci at its surface are
bright, white matter is the darkest tissue. In T1, T1ce and FLAIR the CSF is dark. Twelve intensity statistics of
the skull-stripped volume (background 0), taken at half resolution, describe this (:func:`t2_features`):

1. log of (97th - median) / (median - 3rd percentile) in a central box of the brain (the ventricles);
2. median of a 2-voxel shell one voxel inside the brain's edge over the median inside it (the sulci);
3. skewness of the brain's intensities;
4. (median - 3rd percentile of the central box) / median;
5. (97th percentile of the central box - median) / median;
6. (95th - median) / (median - 5th percentile) of the brain;
7. (75th - median) / (median - 25th percentile) of the brain;
8. (3rd percentile of the central box - 1st of the brain) / (median - 1st of the brain): dark ventricles give ~0;
9. (99th of the brain - 97th of the central box) / (99th - median): bright ventricles give ~0;
10. median depth (distance to the brain's edge over the largest) of the brightest 3 % of the brain;
11. the same for the darkest 3 %;
12. (median - 25th) / (75th - median) of the brain.

A logistic regression on them (:data:`CLASSIFIER`) gives the probability that the volume is a T2; below 0.5 the
volume is refused. ``python tools/fit_contrast.py`` fits it on the four modalities of 100 full-size phantom cases
of seed 0 (40 randomised, 40 shifted, 20 fixed) and measures it on 96 cases of seed 1000 it never saw (32 per
domain); its figures are in ``bundle/docs/inference.md`` (Input). It is on by default in ``inference.json``
(``--check_contrast false`` turns it off).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Standardisation and logistic-regression weights of the twelve features (``python tools/fit_contrast.py``).
CLASSIFIER = {
    "mean": [0.06112, 0.96631, 0.38519, 0.55836, 0.71244, 1.40035, 1.20601, 0.10948, 0.23737, 0.37127, 0.13973,
             0.87952],
    "std": [0.87201, 0.13410, 0.78333, 0.18238, 0.58472, 0.84650, 0.32725, 0.18818, 0.26336, 0.11999, 0.14355,
            0.20098],
    "weights": [1.48024, 1.67595, -0.23157, -1.54051, -0.47855, 0.33792, -0.02069, 1.26409, -0.88608, -0.69288,
                2.15387, -0.21455],
    "bias": -4.21484,
}


def t2_features(volume) -> np.ndarray:
    """The twelve statistics of the module doc for a 3D volume (background 0), as a float64 array.

    Raises:
        ValueError: the volume has too little brain (fewer than 1000 non-zero voxels at half resolution).
    """
    x = np.asarray(volume, dtype=np.float32)[::2, ::2, ::2]
    brain = x > 0
    values = x[brain]
    if values.size < 1000:
        raise ValueError("too little brain to judge its contrast")
    q1, q3, q5, q25, median, q75, q95, q97, q99 = (
        float(v) for v in np.percentile(values, [1, 3, 5, 25, 50, 75, 95, 97, 99])
    )
    where = np.argwhere(brain)
    lo, hi = where.min(0), where.max(0)
    centre, half = (lo + hi) / 2, (hi - lo) * 0.15
    box = tuple(slice(int(c - h), int(c + h) + 1) for c, h in zip(centre, half))
    central = x[box][brain[box]]
    p97, p3 = np.percentile(central, [97, 3])
    inside = ndimage.binary_erosion(brain)
    deep = ndimage.binary_erosion(inside, iterations=2)
    shell = inside & ~deep
    skew = float(((values - values.mean()) ** 3).mean() / values.std() ** 3)
    depth = ndimage.distance_transform_edt(brain)
    depth = depth[brain] / depth.max()
    tiny = 1e-6
    return np.array([
        np.log((p97 - median) / max(median - p3, tiny) + tiny),
        np.median(x[shell]) / np.median(x[deep]) if deep.any() and shell.any() else 1.0,
        skew,
        (median - p3) / median,
        (p97 - median) / median,
        (q95 - median) / max(median - q5, tiny),
        (q75 - median) / max(median - q25, tiny),
        (p3 - q1) / (median - q1 + tiny),
        (q99 - p97) / (q99 - median + tiny),
        np.median(depth[values >= q97]),
        np.median(depth[values <= q3]),
        (median - q25) / (q75 - median + tiny),
    ], dtype=np.float64)  # fmt: skip


def t2_probability(volume) -> float:
    """The classifier's probability that ``volume`` is a T2 (see the module doc)."""
    z = (t2_features(volume) - np.array(CLASSIFIER["mean"])) / np.array(CLASSIFIER["std"])
    return float(1.0 / (1.0 + np.exp(-(z @ np.array(CLASSIFIER["weights"]) + CLASSIFIER["bias"]))))

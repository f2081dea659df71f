"""Figures for the bundle's docs, drawn with matplotlib's Agg backend (no display needed).

Command line (one sub-command per figure function)::

    python bundle/scripts/figures.py phantom_figure data/phantom/BraTS2021_00000 bundle/docs/images/phantom_case.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# file-name endings of each modality in the BraTS 2018/2021 ("_t1ce") and 2023 ("-t1c") layouts
_SUFFIXES = {
    "t1": ("_t1", "-t1n"),
    "t1ce": ("_t1ce", "-t1c"),
    "t2": ("_t2", "-t2w"),
    "flair": ("_flair", "-t2f"),
    "seg": ("_seg", "-seg"),
}


def _case_files(case) -> dict:
    """Map t1/t1ce/t2/flair/seg to file paths, from a BraTS-layout case folder or from a dict of paths."""
    if isinstance(case, dict):
        files = {k: Path(v) for k, v in case.items()}
    else:
        folder = Path(case)
        if not folder.is_dir():
            raise FileNotFoundError(f"case folder not found: {folder}")
        files = {}
        for key, endings in _SUFFIXES.items():
            for path in sorted(folder.glob("*.nii*")):
                stem = path.name.split(".nii")[0]
                if stem.endswith(endings):
                    files[key] = path
    missing = [k for k in _SUFFIXES if k not in files]
    if missing:
        raise FileNotFoundError(f"case {case} lacks files for: {', '.join(missing)}")
    return files


def phantom_figure(case, output_png, slice_index=None) -> str:
    """Draw one axial slice of T1, T1ce, T2, FLAIR and the tumour label over FLAIR, side by side.

    Args:
        case: a case folder in the brats2021/2018/2023 layout, or a dict {"t1", "t1ce", "t2", "flair", "seg":
            path}.
        output_png: where to write the PNG (parent folders are created).
        slice_index: axial slice (third array axis); default: the slice with the most tumour (whole-tumour
            plus tumour-core voxel count), or the middle of the brain when there is no tumour.

    Slices are shown in radiological view (patient's right on the image's left, anterior up) for arrays stored
    like BraTS (axes left, posterior, superior). Each image is windowed to its brain 0.5-99.5 percentiles.
    Labels: necrosis/core red, oedema green, enhancing yellow (BraTS values 1, 2, 4 or 3). Returns the PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    from matplotlib.colors import ListedColormap

    files = _case_files(case)
    vols = {k: np.asarray(nib.load(str(p)).dataobj) for k, p in files.items()}
    seg = vols["seg"].astype(np.int64)
    seg[seg == 4] = 3  # BraTS 2018/2021 enhancing label 4 -> 3 like BraTS 2023
    brain = vols["t1"] > 0
    if slice_index is None:
        # whole tumour plus tumour core per slice, so the chosen slice shows the core when there is one
        per_slice = (seg > 0).sum(axis=(0, 1)) + ((seg == 1) | (seg == 3)).sum(axis=(0, 1))
        if per_slice.max() > 0:
            slice_index = int(per_slice.argmax())
        else:
            zs = np.nonzero(brain.any(axis=(0, 1)))[0]
            slice_index = int((zs[0] + zs[-1]) // 2) if len(zs) else seg.shape[2] // 2
    k = int(slice_index)

    # crop to the brain's in-plane bounding box (over all slices) with a small margin
    xs = np.nonzero(brain.any(axis=(1, 2)))[0]
    ys = np.nonzero(brain.any(axis=(0, 2)))[0]
    if len(xs):
        x0, x1 = max(xs[0] - 5, 0), min(xs[-1] + 6, brain.shape[0])
        y0, y1 = max(ys[0] - 5, 0), min(ys[-1] + 6, brain.shape[1])
    else:
        x0, x1, y0, y1 = 0, brain.shape[0], 0, brain.shape[1]

    def view(a):  # (x, y) slice -> rows anterior..posterior, columns patient right..left
        return a[x0:x1, y0:y1, k].T

    titles = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}
    fig, axes = plt.subplots(1, 5, figsize=(15, 3.6), facecolor="black")
    for ax, key in zip(axes[:4], titles):
        vol = vols[key].astype(np.float32)
        inside = vol[brain] if brain.any() else vol.ravel()
        lo, hi = np.percentile(inside, [0.5, 99.5]) if inside.size else (0.0, 1.0)
        ax.imshow(view(vol), cmap="gray", vmin=0 if lo > 0 else lo, vmax=hi, interpolation="nearest")
        ax.set_title(titles[key], color="white")
    flair = vols["flair"].astype(np.float32)
    hi = np.percentile(flair[brain], 99.5) if brain.any() else flair.max()
    axes[4].imshow(view(flair), cmap="gray", vmin=0, vmax=hi, interpolation="nearest")
    colours = ListedColormap([(0, 0, 0, 0), (0.9, 0.1, 0.1, 0.6), (0.1, 0.85, 0.1, 0.45), (1.0, 0.9, 0.0, 0.7)])
    axes[4].imshow(view(seg), cmap=colours, vmin=0, vmax=3, interpolation="nearest")
    axes[4].set_title("label: core red, oedema green, enh. yellow", color="white", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{Path(files['t1']).parent.name}  axial slice {k}", color="white")
    fig.tight_layout()
    output_png = Path(output_png)
    output_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output_png, dpi=100, facecolor="black")
    plt.close(fig)
    return str(output_png)


if __name__ == "__main__":
    import fire

    fire.Fire({"phantom_figure": phantom_figure})

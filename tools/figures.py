"""Figures for the bundle's docs, drawn with matplotlib's Agg backend (no display needed).

Command line (one sub-command per figure function)::

    python tools/figures.py phantom_figure data/phantom/BraTS2021_00000 bundle/docs/images/phantom_case.png
    python tools/figures.py anymissing_figure runs/anymissing/evaluation/examples.npz out.png --view sagittal
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

_BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
if _BUNDLE not in sys.path:  # a maintainer's tool beside the bundle: make the bundle folder importable
    sys.path.insert(0, _BUNDLE)

from scripts.runtime.conventions import CHANNELS, FILE_SUFFIXES, MODALITY_NAMES, TARGETS  # noqa: E402
from scripts.runtime.files import write_atomic  # noqa: E402

TITLES = MODALITY_NAMES

# file-name endings of each modality and of the label in the BraTS 2018/2021 ("_t1ce") and 2023 ("-t1c") layouts
_SUFFIXES = {
    key: tuple(dict.fromkeys(suffixes[key] for suffixes in FILE_SUFFIXES.values())) for key in (*CHANNELS, "seg")
}


def _save(fig, output_png, dpi: int, facecolor: str = "black") -> str:
    """Write ``fig`` to ``output_png`` atomically (parent folders created), close it, say so; returns the path."""
    import matplotlib.pyplot as plt

    output_png = Path(output_png)
    write_atomic(str(output_png), lambda tmp: fig.savefig(tmp, dpi=dpi, facecolor=facecolor))
    plt.close(fig)
    print(f"wrote {output_png}")
    return str(output_png)


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

    titles = {k: MODALITY_NAMES[k] for k in ("t1", "t1ce", "t2", "flair")}  # panel order
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
    return _save(fig, output_png, dpi=100)


def _load_case_arrays(dataset_dir, entry) -> dict:
    """Real FLAIR, T1, T1ce, T2 and label arrays of one datalist entry (BraTS file list or MSD 4D image)."""
    import nibabel as nib

    root = Path(dataset_dir)
    image = entry["image"]
    if isinstance(image, str):  # MSD: one 4D file, channels FLAIR, T1w, T1gd, T2w
        data = np.asarray(nib.load(str(root / image)).dataobj, dtype=np.float32)
        vols = {k: data[..., i] for i, k in enumerate(CHANNELS)}
    else:
        vols = {k: np.asarray(nib.load(str(root / f)).dataobj, dtype=np.float32) for k, f in zip(CHANNELS, image)}
    vols["seg"] = np.asarray(nib.load(str(root / entry["label"])).dataobj) if entry.get("label") else None
    return vols


def synthesis_figure(dataset_dir, inference_dir, output_png, case=None, split="test", slice_index=None,
                     view="axial") -> str:
    """Compare the synthesis with the real images: T2 | synthesised FLAIR, T1, T1ce (top row) and the real
    FLAIR, T1, T1ce with the whole-tumour contour (bottom row), on one axial or sagittal slice.

    Args:
        dataset_dir: folder holding ``datalist.json`` (the real images).
        inference_dir: output folder of ``inference.json`` (``<case>_{flair,t1,t1ce}.nii.gz``).
        output_png: PNG to write.
        case: case id (default: the first case of ``split`` that has outputs).
        split: datalist split to look in.
        slice_index: the slice (default: the slice with the most tumour, else the middle of the brain).
        view: ``"axial"`` (radiological) or ``"sagittal"`` (anterior left, superior up): a model that works slice
            by slice shows its slice-to-slice inconsistency as horizontal stripes in the sagittal view.

    Real images are windowed to their brain 0.5-99.5 percentiles; the synthesis is shown on its [0, 1] scale.
    Returns the PNG path.
    """
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    targets = TARGETS
    with open(Path(dataset_dir) / "datalist.json") as f:
        entries = json.load(f)[split]
    out = Path(inference_dir)
    ids = [Path(e["case"]).name for e in entries]
    have = [i for i, c in enumerate(ids) if all((out / f"{c}_{t}.nii.gz").is_file() for t in targets)]
    if case is not None:
        have = [i for i in have if ids[i] == case]
    if not have:
        raise FileNotFoundError(f"no synthesised case {case or ''} of split {split!r} found in {out}")
    entry, cid = entries[have[0]], ids[have[0]]
    real = _load_case_arrays(dataset_dir, entry)
    synth = {t: np.asarray(nib.load(str(out / f"{cid}_{t}.nii.gz")).dataobj, dtype=np.float32) for t in targets}
    if view not in ("axial", "sagittal"):
        raise ValueError(f"view must be 'axial' or 'sagittal', got {view!r}")
    brain = real["t2"] > 0
    tumour = real["seg"] > 0 if real["seg"] is not None else np.zeros_like(brain)
    axis = 2 if view == "axial" else 0
    others = tuple(a for a in range(3) if a != axis)
    if slice_index is None:
        per_slice = tumour.sum(axis=others)
        zs = np.nonzero(brain.any(axis=others))[0]
        slice_index = int(per_slice.argmax()) if per_slice.max() > 0 else int((zs[0] + zs[-1]) // 2)
    k = int(slice_index)
    shown = view

    def view(a):
        if shown == "axial":  # radiological view of BraTS-stored arrays: rows anterior..posterior, columns right..left
            return a[:, :, k].T
        return a[k, ::-1, ::-1].T  # sagittal: rows superior..inferior, columns anterior..posterior

    def window(a):
        inside = a[brain]
        return (0, np.percentile(inside, 99.5)) if inside.size else (0, 1)

    fig, axes = plt.subplots(2, 4, figsize=(13, 6.8), facecolor="black")
    axes[0, 0].imshow(view(real["t2"]), cmap="gray", vmin=0, vmax=window(real["t2"])[1])
    axes[0, 0].set_title("input T2", color="white")
    axes[1, 0].imshow(view(tumour.astype(np.float32)), cmap="gray", vmin=0, vmax=1)
    axes[1, 0].set_title("whole tumour (label)", color="white")
    for j, t in enumerate(targets, start=1):
        axes[0, j].imshow(view(synth[t]), cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(f"synthesised {TITLES[t]}", color="white")
        axes[1, j].imshow(view(real[t]), cmap="gray", vmin=0, vmax=window(real[t])[1])
        axes[1, j].set_title(f"real {TITLES[t]}", color="white")
        if np.take(tumour, k, axis=axis).any():
            for row in (0, 1):
                axes[row, j].contour(view(tumour.astype(np.float32)), levels=[0.5], colors="yellow", linewidths=0.7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(f"{cid}  {shown} slice {k}", color="white")
    fig.tight_layout()
    return _save(fig, output_png, dpi=90)


def training_figure(run_dir, output_png, smooth: int = 10) -> str:
    """Loss terms (every ``log_every``-th iteration, as training logged them) and validation PSNR/SSIM per
    epoch, read from ``run_dir/tensorboard``.

    Args:
        run_dir: a training output folder (``<output_dir>/<variant>``).
        output_png: PNG to write.
        smooth: moving-average window (logged points) for the loss curves.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    if not tags:
        raise FileNotFoundError(f"no TensorBoard scalars under {Path(run_dir) / 'tensorboard'}")
    groups = {
        "critic": ["d_loss", "d_real", "d_fake"],
        "generator": ["g_loss", "g_adv"],
        "weighted terms of L_G": ["g_l1", "g_cls", "g_seg"],
        "validation": ["val_psnr", "val_ssim"],
    }
    weights = {"g_l1": 0.1, "g_cls": 10.0, "g_seg": 50.0}
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4))
    for ax, (title, names) in zip(axes, groups.items()):
        for name in names:
            tag = next((t for t in tags if t.split("/")[-1] == name or t.endswith(name)), None)
            if tag is None:
                continue
            steps = np.array([e.step for e in acc.Scalars(tag)])
            vals = np.array([e.value for e in acc.Scalars(tag)]) * weights.get(name, 1.0)
            if title != "validation" and len(vals) > smooth:
                vals = np.convolve(vals, np.ones(smooth) / smooth, mode="valid")
                steps = steps[smooth - 1 :]
            label = f"{weights[name]:g}·{name}" if name in weights else name
            if name == "val_ssim":
                ax2 = ax.twinx()
                ax2.plot(steps, vals, "o-", color="tab:orange", label=label)
                ax2.set_ylabel("SSIM")
                ax2.legend(loc="lower right", fontsize=8)
            else:
                ax.plot(steps, vals, "o-" if title == "validation" else "-", label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch" if title == "validation" else "iteration")
        ax.legend(fontsize=8, loc="upper left" if title == "validation" else "best")
    fig.tight_layout()
    return _save(fig, output_png, dpi=90, facecolor="white")


def comparison_figure(examples, output_png, names=None) -> str:
    """A figure like the paper's Fig. 3: for one slice, the input T2, each method's synthesis and the real image,
    one row per target (FLAIR, T1, T1ce), with the whole-tumour contour in yellow.

    Args:
        examples: method -> ``examples.npz`` written by ``evaluate.json`` (``scripts.runtime.evaluation``); all must hold
            the same case and slice (they do when the runs scored the same split: the slice is chosen from the
            label alone).
        output_png: PNG to write.
        names: method -> display name (default: the method keys).

    Every image is on the [0, 1] scale of the paper-convention metrics (each slice divided by its own maximum).
    Returns the PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = TARGETS
    loaded = {m: np.load(p) for m, p in examples.items()}
    if not loaded:
        raise ValueError("no examples to draw")
    first = next(iter(loaded.values()))
    where = {(str(e["case"]), int(e["slice"])) for e in loaded.values()}
    if len(where) > 1:
        raise ValueError(f"the examples show different slices: {sorted(where)}")
    names = names or {}

    def unit(a):
        a = np.clip(np.asarray(a, dtype=np.float32), 0, None)
        return a / max(float(a.max()), 1e-8)

    def view(a):  # arrays (x, y) as stored (RAS after Orientationd): rows anterior..posterior, columns right..left
        return np.flipud(np.fliplr(a.T))

    tumour = view((first["label"] > 0).astype(np.float32))
    methods = list(loaded)
    cols = 2 + len(methods)
    fig, axes = plt.subplots(3, cols, figsize=(2.2 * cols, 7), facecolor="black", squeeze=False)
    for row, t in enumerate(targets):
        panels = [("input T2", first["t2"])]
        panels += [(names.get(m, m), loaded[m][f"pred_{m}"][row]) for m in methods]
        panels += [(f"real {TITLES[t]}", first["real"][row])]
        for col, (title, image) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(view(unit(image)), cmap="gray", vmin=0, vmax=1)
            if tumour.any():
                ax.contour(tumour, levels=[0.5], colors="yellow", linewidths=0.6)
            ax.set_title(title, color="white", fontsize=8)
            ax.axis("off")
        axes[row, 0].text(-8, 64, TITLES[t], color="white", rotation=90, va="center", ha="right", fontsize=10)
    fig.suptitle(f"{first['case']}  kept slice {int(first['slice'])} (128x128)", color="white", fontsize=9)
    fig.tight_layout()
    return _save(fig, output_png, dpi=90)


def anymissing_figure(examples, output_png, view: str = "axial") -> str:
    """The any-missing generator on one slice (``examples.npz`` of ``evaluate.json`` on an any-missing model): per modality
    (columns FLAIR, T1, T1ce, T2), the real image; its synthesis from the three others (BraSyn) and that scenario's
    best trivial baseline; its synthesis from T2 alone, the paper's TC-MGAN from T2 alone (when it was evaluated)
    and that scenario's best trivial baseline (the T2 or the inverted T2); the whole tumour outlined in yellow.
    Real images and baselines are windowed to their own 99.5th percentile, syntheses to [0, 1].

    Args:
        examples: the ``examples.npz`` file.
        output_png: PNG to write.
        view: ``"axial"`` or ``"sagittal"`` (through the most tumour of the case).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if view not in ("axial", "sagittal"):
        raise ValueError(f"view must be 'axial' or 'sagittal', got {view!r}")
    ex = dict(np.load(str(examples)))
    show = (lambda a: a.T) if view == "axial" else (lambda a: a[::-1, ::-1].T)  # as synthesis_figure shows them
    tumour = show(ex[f"label_{view}"].astype(np.float32))
    real = {m: ex[f"real_{m}_{view}"] for m in CHANNELS}
    def baselines(scenarios):  # the best trivial baseline of each scenario, titled by its choice
        return {m: (ex[f"baseline_{s}_{view}"], f"baseline: {ex[f'baseline_{s}_choice']}") for m, s in scenarios}

    # (name, {modality: image or (image, title)}, windowed like the real images)
    rows = [("real", {m: real[m] for m in CHANNELS}, True),
            ("from the other three", {m: ex[f"anymissing_missing_{m}_{view}"] for m in CHANNELS}, False),
            ("", baselines((m, f"missing_{m}") for m in CHANNELS), True),
            ("from T2 alone", {t: ex[f"anymissing_t2_only_{t}_{view}"] for t in TARGETS}, False)]  # fmt: skip
    if any(f"paper_t2_only_{t}_{view}" in ex for t in TARGETS):
        rows.append(("TC-MGAN, from T2 alone", {t: ex[f"paper_t2_only_{t}_{view}"] for t in TARGETS}, False))
    rows.append(("", baselines((t, f"t2_only_{t}") for t in TARGETS), True))
    fig, axes = plt.subplots(len(rows), len(CHANNELS), figsize=(3.1 * len(CHANNELS), 3.0 * len(rows)),
                             facecolor="black", squeeze=False)  # fmt: skip
    for r, (name, images, own_window) in enumerate(rows):
        for c, m in enumerate(CHANNELS):
            ax = axes[r, c]
            ax.axis("off")
            image, title = images.get(m), f"{TITLES[m]} {name}"
            if image is None:
                continue
            if isinstance(image, tuple):
                image, title = image[0], f"{TITLES[m]} {image[1]}"
            inside = image[image > 0]
            top = np.percentile(inside, 99.5) if own_window and inside.size else 1.0
            ax.imshow(show(image), cmap="gray", vmin=0, vmax=top)
            if tumour.any():
                ax.contour(tumour, levels=[0.5], colors="yellow", linewidths=0.6)
            ax.set_title(title, color="white", fontsize=9)
    index = int(ex[f"{view}_index"])
    fig.suptitle(f"{ex['case']}  {view} slice {index}  (any-missing generator)", color="white", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the title
    return _save(fig, output_png, dpi=80)


def curves_figure(curves: dict, output_png) -> str:
    """Validation curves of a study's trainings, one panel per stage (segmenter, each GAN, each downstream U-Net),
    one line per seed: ``curves`` maps a panel title to ``{"metric": name, "seeds": [[(epoch, value), ...], ...]}``
    (``study_report.validation_curves``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(curves), 1)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (title, curve) in zip(axes.flat, curves.items()):
        for k, points in enumerate(curve["seeds"]):
            if points:
                epochs, values = zip(*points)
                ax.plot(epochs, values, "o-", markersize=3, label=f"seed {k}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel(curve["metric"], fontsize=8)
        ax.tick_params(labelsize=7)
        if len(curve["seeds"]) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, output_png, dpi=80, facecolor="white")


if __name__ == "__main__":
    from scripts.runtime.command_line import run_tool

    run_tool({"phantom_figure": phantom_figure, "synthesis_figure": synthesis_figure,
              "training_figure": training_figure, "comparison_figure": comparison_figure,
              "anymissing_figure": anymissing_figure, "curves_figure": curves_figure})

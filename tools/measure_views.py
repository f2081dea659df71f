"""Measure tri-planar synthesis and its uncertainty map (issue #27) on held-out cases: the axial-only synthesis of a
generator against its fused one (``BrainSliceInferer(views=..., flip=...)``), both beside the trivial baselines, and
how well the fused passes' spread points at the error.

    python tools/measure_views.py --dataset_dir runs/shipped/ood --ckpt_path bundle/models/model.pt \\
        --views all --flip true --output runs/views/views.json --figure runs/views/views.png

Per target, over the cases (mean and standard deviation): brain PSNR and the axial, coronal and sagittal SSIM of
the quality protocol (``scripts.runtime.metrics.protocol_scores``) for the axial-only synthesis, the fused one, the
T2 and the inverted T2, and the fused minus axial-only differences per case. For the uncertainty map (the spread, in
the written [0, 1] units): over brain voxels, the Spearman rank correlation between the spread and the absolute
error of the fused synthesis (both volumes normalised as the protocol normalises them), the mean error of the 10 %
most uncertain voxels divided by the brain's mean error, and the mean error in each spread decile (the calibration
figure). Seconds per volume of one view and of the fused passes (network and fusion; loading excluded).
Prints Markdown tables; ``--output`` writes every figure as JSON, ``--figure`` the calibration plot and the three
planes of the first case (axial-only, fused, uncertainty, error, the tumour outlined).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bundle"))

from scripts.runtime.metrics import PLANE_METRICS  # noqa: E402

#: voxels sampled per target for the rank correlation (all brain voxels of 8 cases would be ~10 million)
SAMPLE = 400_000


def ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as Spearman's correlation needs."""
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + ends - 1) / 2.0)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two equally long arrays (nan when either is constant)."""
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def calibration(spread: np.ndarray, error: np.ndarray, bins: int = 10) -> dict:
    """The uncertainty map's figures over voxels: Spearman, top-decile error ratio, mean error per spread decile."""
    order = np.argsort(spread, kind="stable")
    deciles = [float(error[part].mean()) for part in np.array_split(order, bins)]
    top = order[int(len(order) * 0.9) :]
    rng = np.random.default_rng(0)
    pick = rng.choice(len(spread), min(SAMPLE, len(spread)), replace=False)
    return {"spearman": spearman(spread[pick], error[pick]), "top_decile_ratio": float(error[top].mean() / error.mean()),
            "error_by_decile": deciles, "mean_error": float(error.mean()), "voxels": int(len(spread))}  # fmt: skip


def summary(values) -> dict:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    return {"mean": float(v.mean()) if len(v) else float("nan"), "std": float(v.std()) if len(v) else float("nan"),
            "n": int(len(v)), "n_nan": int(len(values) - len(v))}  # fmt: skip


def measure(dataset_dir: str, ckpt_path: str, views="all", flip: bool = False, split: str = "test", output: str = "",
            figure: str = "", device: str = "cpu", max_cases: int = 0) -> dict:  # fmt: skip
    """Score the axial-only and the fused synthesis of ``ckpt_path`` on ``dataset_dir``'s ``split``; see the module."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from scripts.runtime.checkpoints import load_model
    from scripts.runtime.command_line import flag
    from scripts.runtime.conventions import T2_INDEX, TARGETS
    from scripts.runtime.data import case_name, load_split
    from scripts.runtime.evaluation import to_input_grid
    from scripts.runtime.files import write_json
    from scripts.runtime.inference import BrainSliceInferer
    from scripts.runtime.metrics import brain_unit, inverted_baseline, protocol_brain, protocol_scores

    parser = ConfigParser()
    parser.read_config(os.path.join(REPO, "bundle", "configs", "train.json"))
    parser.update({"bundle_root": os.path.join(REPO, "bundle"), "dataset_dir": dataset_dir})
    load = Compose(parser.get_parsed_content("load_transforms"))
    volume_transform = Compose(parser.get_parsed_content("image_transforms"))
    cases = load_split(os.path.join(dataset_dir, "datalist.json"), split, max_cases=int(max_cases) or None)
    network = load_model(ckpt_path, device).eval()
    one = BrainSliceInferer(sw_batch_size=32)
    fused = BrainSliceInferer(sw_batch_size=32, views=views, flip=flag(flip, "flip"), uncertainty=True)
    scores = {t: {m: {k: [] for k in PLANE_METRICS} for m in ("axial", "fused", "t2", "inverted_t2")} for t in TARGETS}
    seconds = {"axial": [], "fused": []}
    voxels = {t: ([], []) for t in TARGETS}
    shown = None
    for n, case in enumerate(cases):
        data = load(dict(case))
        image, tumour = torch.as_tensor(data["image"]).float(), torch.as_tensor(data["label"])[0] > 0
        t2 = image[T2_INDEX]
        brain = protocol_brain(t2)
        x = volume_transform({"image": image[T2_INDEX : T2_INDEX + 1]})["image"]
        outputs = {}
        for name, inferer in (("axial", one), ("fused", fused)):
            start = time.perf_counter()
            with torch.inference_mode():
                out = inferer(x.unsqueeze(0).to(device), network)[0]
            seconds[name].append(time.perf_counter() - start)
            outputs[name] = out
        axial = to_input_grid(((outputs["axial"] + 1) / 2).clamp(0, 1), x, volume_transform) * (t2 > 0)
        mean, spread = outputs["fused"][: len(TARGETS)], outputs["fused"][len(TARGETS) :] / 2
        fused_volume = to_input_grid(((mean + 1) / 2).clamp(0, 1), x, volume_transform) * (t2 > 0)
        spread = to_input_grid(spread, x, volume_transform) * (t2 > 0)
        inverted = inverted_baseline(t2, brain)
        for k, target in enumerate(TARGETS):
            for method, vol in (("axial", axial[k]), ("fused", fused_volume[k]), ("t2", t2), ("inverted_t2", inverted)):
                row = protocol_scores(vol, image[k], brain, tumour, metrics=PLANE_METRICS)
                for metric in PLANE_METRICS:
                    scores[target][method][metric].append(row[metric])
            error = (brain_unit(fused_volume[k], brain) - brain_unit(image[k], brain)).abs()[brain]
            voxels[target][0].append(spread[k][brain].numpy())
            voxels[target][1].append(error.numpy())
        if shown is None:
            shown = {"case": case_name(case), "t2": t2.numpy(), "tumour": tumour.numpy(), "real": image[:3].numpy(),
                     "axial": axial.numpy(), "fused": fused_volume.numpy(), "spread": spread.numpy()}  # fmt: skip
        print(f"[{n + 1}/{len(cases)}] {case_name(case)}: axial {seconds['axial'][-1]:.1f} s, fused "
              f"{seconds['fused'][-1]:.1f} s", flush=True)  # fmt: skip
    result = {"dataset_dir": dataset_dir, "ckpt_path": ckpt_path, "views": list(fused.views), "flip": fused.flip,
              "cases": len(cases), "threads": torch.get_num_threads(), "scores": {}, "differences": {},
              "uncertainty": {}}  # fmt: skip
    for target in TARGETS:
        result["scores"][target] = {m: {k: summary(v) for k, v in per.items()} for m, per in scores[target].items()}
        result["differences"][target] = {
            k: summary(np.subtract(scores[target]["fused"][k], scores[target]["axial"][k])) for k in PLANE_METRICS
        }
        result["uncertainty"][target] = calibration(np.concatenate(voxels[target][0]), np.concatenate(voxels[target][1]))
    result["seconds_per_volume"] = {k: summary(v) for k, v in seconds.items()}
    result["time_ratio"] = result["seconds_per_volume"]["fused"]["mean"] / result["seconds_per_volume"]["axial"]["mean"]
    print(report(result))
    if output:
        write_json(output, result, indent=1)
    if figure and shown is not None:
        calibration_figure(result, shown, figure)
    return result


def report(result: dict) -> str:
    """Markdown tables of :func:`measure`'s result."""
    names = {"protocol_psnr": "PSNR (dB)", "protocol_ssim_axial": "SSIM axial", "protocol_ssim_coronal": "SSIM coronal",
             "protocol_ssim_sagittal": "SSIM sagittal"}  # fmt: skip
    lines = [f"views {','.join(result['views'])}, flip {result['flip']}, {result['cases']} cases\n",
             "| target | method | " + " | ".join(names[m] for m in PLANE_METRICS) + " |",
             "|---|---|" + "---|" * len(PLANE_METRICS)]  # fmt: skip
    for target, methods in result["scores"].items():
        for method, metrics in methods.items():
            cells = [f"{metrics[m]['mean']:.3f} ± {metrics[m]['std']:.3f}" for m in PLANE_METRICS]
            lines.append(f"| {target} | {method} | " + " | ".join(cells) + " |")
        cells = [f"{result['differences'][target][m]['mean']:+.3f} ± {result['differences'][target][m]['std']:.3f}"
                 for m in PLANE_METRICS]  # fmt: skip
        lines.append(f"| {target} | fused − axial | " + " | ".join(cells) + " |")
    lines += ["", "| target | Spearman (spread, error) | top-decile error ratio | mean error | voxels |", "|---|---|---|---|---|"]
    for target, u in result["uncertainty"].items():
        lines.append(f"| {target} | {u['spearman']:.3f} | {u['top_decile_ratio']:.2f} | {u['mean_error']:.4f} | "
                     f"{u['voxels']} |")  # fmt: skip
    s = result["seconds_per_volume"]
    lines.append(f"\nseconds per volume ({result['threads']} threads): one view {s['axial']['mean']:.1f}, fused "
                 f"{s['fused']['mean']:.1f} ({result['time_ratio']:.2f}x)")  # fmt: skip
    return "\n".join(lines)


def calibration_figure(result: dict, shown: dict, output_png: str) -> str:
    """Error by spread decile per target (left), and for the first case the three planes through its tumour
    centre: axial-only and fused T1ce, its uncertainty and absolute error, the tumour outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scripts.runtime.files import write_atomic

    fig = plt.figure(figsize=(15, 9))
    grid = fig.add_gridspec(3, 6)
    ax = fig.add_subplot(grid[:, :2])
    for target, u in result["uncertainty"].items():
        ax.plot(range(1, 11), u["error_by_decile"], marker="o", label=f"{target} (Spearman {u['spearman']:.2f})")
    ax.set_xlabel("spread decile (1 = most certain)")
    ax.set_ylabel("mean absolute error (protocol units)")
    ax.legend()
    k = 2  # T1ce: the target where the enhancing rim shows
    tumour = shown["tumour"]
    centre = [int(np.round(np.mean(ix))) for ix in np.nonzero(tumour)] if tumour.any() else [s // 2 for s in tumour.shape]
    brain = shown["t2"] > 0

    def unit(a):  # each volume by its own brain 99.5th percentile, as the protocol normalises (upper end)
        return np.clip(a / max(float(np.percentile(a[brain], 99.5)), 1e-6), 0, 1)

    error = np.abs(unit(shown["fused"][k]) - unit(shown["real"][k])) * brain
    panels = [("axial-only", shown["axial"][k], "gray", 1), ("fused", shown["fused"][k], "gray", 1),
              ("uncertainty", shown["spread"][k], "magma", None), ("|fused − real|", error, "magma", 0.5)]  # fmt: skip
    for row, axis in enumerate((2, 1, 0)):  # axial, coronal, sagittal
        for col, (title, vol, cmap, top) in enumerate(panels):
            a = fig.add_subplot(grid[row, 2 + col])
            cut = np.take(vol, centre[axis], axis=axis).T[::-1]
            a.imshow(cut, cmap=cmap, vmin=0, vmax=top if top is not None else max(float(cut.max()), 1e-6))
            if np.take(tumour, centre[axis], axis=axis).any():
                a.contour(np.take(tumour, centre[axis], axis=axis).T[::-1].astype(float), levels=[0.5], colors="cyan",
                          linewidths=0.6)  # fmt: skip
            a.set_title(f"{title} ({['sagittal', 'coronal', 'axial'][axis]})", fontsize=8)
            a.axis("off")
    fig.suptitle(f"{shown['case']}: T1ce, views {','.join(result['views'])}, flip {result['flip']}")
    fig.tight_layout()
    write_atomic(output_png, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)
    print(f"wrote {output_png}")
    return output_png


if __name__ == "__main__":
    from scripts.runtime.command_line import run_tool

    run_tool(measure, serialize=lambda result: None)

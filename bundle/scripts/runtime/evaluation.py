"""Table 1: synthesis quality of a generator checkpoint (and of two trivial baselines) on a datalist split.

Driven by ``configs/evaluate.json``, which declares the network, the MONAI transforms and the inferer; this module
runs them case by case and writes the tables:

- per case: the four real modalities and the label are loaded once at full resolution (``load_transform``);
- **paper convention**: the slices kept by the brain filter, resized to 128x128 (``slice_transform``, the training
  preprocessing), go through G; each synthesised and real slice is scaled by its own maximum
  (:func:`scripts.runtime.metrics.paper_slice_scores`);
- **volume convention**: G runs over the whole T2 volume exactly as ``inference.json`` does (``volume_transform`` =
  resize + scaling, the inferer, back to the input grid with the inverse resize, background 0), and the result is
  scored against the real volume inside the brain, the tumour and the healthy brain
  (:func:`scripts.runtime.metrics.volume_scores`);
- **baselines**: ``T2`` (the source itself) and ``inverted T2`` (1 - T2 on [0, 1], inside the brain, 0 outside),
  normalised the same ways.

Outputs in ``output_dir``: ``per_case.csv`` (one row per case, method and target), ``per_slice.csv``,
``scores.json`` (mean, std and counts per method, target and metric), ``table1.md`` / ``table1.csv`` (both
conventions, shaped like the paper's Table 1) and ``examples.npz`` (the slice with the largest tumour, for the
figure). :func:`write_table1` merges the ``scores.json`` of several runs (one per variant) into one table.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor

from .conventions import T2_INDEX, TARGET_NAMES, TARGETS, VARIANT_NAMES
from .data import case_name, load_split, neighbour_slices
from .checkpoints import cpu_weights, save_atomic
from .files import write_atomic, write_csv, write_json, write_text
from .metrics import (
    PROTOCOL_METRICS,
    REGION_METRICS,
    brain_unit,
    paper_slice_scores,
    percentile_unit,
    protocol_brain,
    protocol_scores,
    summarise,
    volume_scores,
)

logger = logging.getLogger(__name__)

#: Display names of the methods (the variants, then the baselines), in table order.
METHOD_NAMES = {**VARIANT_NAMES, "recommended": "recommended (TC-MGAN, 2.5D, resize-conv, augmented)",
                "t2": "T2 (baseline)", "inverted_t2": "inverted T2 (baseline)"}
BASELINES = ("t2", "inverted_t2")
SLICE_METRICS = ("psnr", "ssim")
VOLUME_METRICS = ("psnr_brain", "ssim_brain", "ssim_tumour", "ssim_healthy") + PROTOCOL_METRICS + tuple(
    k for k in REGION_METRICS if k not in PROTOCOL_METRICS
)

#: The paper's Table 1 (BraTS 2018, 85 test subjects, 2D slices; not comparable with phantom results).
PAPER_TABLE1 = {
    "TC-MGAN (paper, BraTS18)": {"flair": (24.64, 0.927), "t1": (25.78, 0.952), "t1ce": (25.68, 0.939)},
}


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (clipped)."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def to_input_grid(volume: torch.Tensor, like, volume_transform: Callable) -> torch.Tensor:
    """``volume`` ``(C, h, w, D)`` on the network's grid -> the input's grid: ``volume_transform`` (the resize and
    scaling that made ``like``, a MetaTensor that recorded them) inverted; float32 on the CPU."""
    meta = MetaTensor(torch.as_tensor(volume).as_subclass(torch.Tensor).cpu().float(), meta=dict(like.meta),
                      applied_operations=list(like.applied_operations))  # fmt: skip
    return torch.as_tensor(volume_transform.inverse({"image": meta})["image"]).float()


def synthesise_volume(network: torch.nn.Module, t2: torch.Tensor, volume_transform: Callable, inferer,
                      device) -> torch.Tensor:  # fmt: skip
    """The inference workflow's synthesis of a raw ``(1, H, W, D)`` T2 -> ``(3, H, W, D)`` in [0, 1] on its grid
    (``volume_transform``: resize + scaling, inverted after ``inferer`` ran ``network``; background 0)."""
    x = volume_transform({"image": t2})["image"]
    with torch.inference_mode():
        pred = inferer(x.unsqueeze(0).to(device), network)[0]
    return to_input_grid(_to_unit(pred.cpu()), x, volume_transform) * (t2 > 0).float()


class SynthesisEvaluation:
    """Score one generator (and the baselines) on a list of cases; see the module doc.

    Args:
        network: the generator (``SynthesisNet``), loaded with its weights; ``None`` scores the baselines only.
        cases: datalist entries (``image``: the four modality files in ``CHANNELS`` order, ``label``).
        load_transform: full-resolution loading (image ``(4, H, W, D)`` RAS, label ``(1, H, W, D)`` internal labels).
        slice_transform: training preprocessing applied after loading (brain-slice filter, resize, [-1, 1] scaling).
        volume_transform: inference preprocessing of the T2 ``(1, H, W, D)`` (resize, [-1, 1] scaling), applied to
            ``{"image": t2}``; its resize is inverted to bring the synthesis back to the input grid.
        inferer: a ``BrainSliceInferer`` (batched 2D forward over the brain slices); its ``runner`` also runs the
            paper-convention slices.
        output_dir: folder for the outputs.
        method: name of the checkpoint's method (``pix2pix``, ``mgan``, ``tcmgan``, ``tcmgan_bw`` or any name).
        baselines: also score the T2 and inverted-T2 baselines.
        device: where the network runs.
    """

    def __init__(
        self,
        network: torch.nn.Module | None,
        cases: Sequence[Mapping],
        load_transform: Callable,
        slice_transform: Callable,
        volume_transform: Callable,
        inferer,
        output_dir: str,
        method: str = "tcmgan",
        baselines: bool = True,
        device="cpu",
    ):
        if not cases:
            raise ValueError("no cases to evaluate")
        self.network = network.eval() if network is not None else None
        self.cases = list(cases)
        self.load_transform = load_transform
        self.slice_transform = slice_transform
        self.volume_transform = volume_transform
        self.inferer = inferer
        self.output_dir = str(output_dir)
        self.method = str(method)
        self.baselines = bool(baselines)
        self.device = torch.device(device)
        self.methods = ([self.method] if network is not None else []) + (list(BASELINES) if self.baselines else [])
        if not self.methods:
            raise ValueError("nothing to evaluate: no network and baselines=False")

    # --- one case -------------------------------------------------------------------------------------------------

    def _synthesise_slices(self, t2: torch.Tensor) -> torch.Tensor:
        """G over ``(N, k, h, w)`` T2 slices (k = 1, or a 2.5D stack) in [-1, 1] -> ``(N, 3, h, w)`` in [0, 1]."""
        out = self.inferer.runner(t2.to(self.device), self.network)
        return _to_unit(out).cpu()

    def _synthesise_volume(self, t2: torch.Tensor) -> torch.Tensor:
        return synthesise_volume(self.network, t2, self.volume_transform, self.inferer, self.device)

    def _slice_predictions(self, image128: torch.Tensor, network_input: torch.Tensor) -> dict[str, torch.Tensor]:
        """Method -> ``(N, 3, h, w)`` predictions on the kept 128x128 slices (channel-first ``(4, h, w, N)`` input;
        ``network_input`` ``(N, k, h, w)``: G's input for them, the T2 slices or their 2.5D stacks)."""
        t2 = image128[T2_INDEX : T2_INDEX + 1].permute(3, 0, 1, 2)  # (N, 1, h, w), [-1, 1]
        t2_unit = _to_unit(t2)
        brain = (t2 > -1).float()
        preds = {}
        if self.network is not None:
            preds[self.method] = self._synthesise_slices(network_input)
        if self.baselines:
            preds["t2"] = t2_unit.expand(-1, 3, -1, -1)
            preds["inverted_t2"] = ((1 - t2_unit) * brain).expand(-1, 3, -1, -1)
        return preds

    def _volume_predictions(self, t2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Method -> ``(3, H, W, D)`` predictions on the full grid (raw T2 ``(1, H, W, D)`` input)."""
        preds = {}
        if self.network is not None:
            preds[self.method] = self._synthesise_volume(t2)
        if self.baselines:
            brain = (t2 > 0).float()
            unit = percentile_unit(t2) * brain
            preds["t2"] = unit.expand(3, -1, -1, -1)
            preds["inverted_t2"] = ((1 - unit) * brain).expand(3, -1, -1, -1)
        return preds

    def score_case(self, case: Mapping) -> tuple[list[dict], list[dict], dict]:
        """Per-case rows, per-slice rows and the example slice of one datalist entry."""
        name = case_name(case)
        data = self.load_transform(dict(case))
        image, label = torch.as_tensor(data["image"]).float(), torch.as_tensor(data["label"])
        sliced = self.slice_transform({"image": data["image"], "label": data["label"]})
        image128, label128 = torch.as_tensor(sliced["image"]).float(), torch.as_tensor(sliced["label"])
        # the slices the brain filter kept (with 2.5D context the volume also holds their neighbours)
        centre = sliced.get("centre")
        keep = torch.arange(image128.shape[-1]) if centre is None else torch.nonzero(torch.as_tensor(centre)).flatten()
        context = int(getattr(self.network, "in_channels", 1)) if self.network is not None else 1
        if context > 1:
            network_input = neighbour_slices(image128[T2_INDEX], keep, context)
        else:
            network_input = image128[T2_INDEX : T2_INDEX + 1, ..., keep].permute(3, 0, 1, 2)
        image128, label128 = image128[..., keep], label128[..., keep]
        real128 = _to_unit(image128[: len(TARGETS)].permute(3, 0, 1, 2))  # (N, 3, h, w)
        slice_preds = self._slice_predictions(image128, network_input)
        volume_preds = self._volume_predictions(image[T2_INDEX : T2_INDEX + 1])
        brain, tumour = image[T2_INDEX] > 0, label[0] > 0
        # the quality protocol normalises every volume itself: the T2 baseline is the raw T2, the inverted one
        # is 1 - T2 scaled to [0, 1] over the protocol's brain (0 outside the T2's non-zero voxels)
        t2, q_brain = image[T2_INDEX], protocol_brain(image[T2_INDEX])
        q_preds = {m: v for m, v in volume_preds.items() if m not in BASELINES}
        if self.baselines:
            q_preds["t2"] = t2.expand(3, -1, -1, -1)
            q_preds["inverted_t2"] = ((1 - brain_unit(t2, q_brain)) * (t2 > 0)).expand(3, -1, -1, -1)

        case_rows, slice_rows = [], []
        for method in self.methods:
            for k, target in enumerate(TARGETS):
                psnr, ssim = paper_slice_scores(slice_preds[method][:, k : k + 1], real128[:, k : k + 1])
                vol = volume_scores(volume_preds[method][k], image[k], brain, tumour)
                vol.update(protocol_scores(q_preds[method][k], image[k], q_brain, tumour))
                row = {"case": name, "method": method, "target": target, "n_slices": len(psnr)}
                row.update(psnr=summarise(psnr.tolist())["mean"], ssim=float(ssim.mean()), **vol)
                case_rows.append(row)
                slice_rows += [
                    {"case": name, "method": method, "target": target, "slice": i, "psnr": float(p), "ssim": float(s)}
                    for i, (p, s) in enumerate(zip(psnr, ssim))
                ]
        # the example: the kept slice with the most tumour
        area = (label128[0] > 0).flatten(0, 1).sum(0)
        z = int(area.argmax())
        example = {
            "case": name,
            "slice": z,
            "tumour_pixels": int(area[z]),
            "t2": _to_unit(image128[T2_INDEX, ..., z]).numpy(),
            "real": real128[z].numpy(),
            "label": label128[0, ..., z].numpy(),
            **{f"pred_{m}": p[z].numpy() for m, p in slice_preds.items()},
        }
        return case_rows, slice_rows, example

    # --- the run --------------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Score every case (a log line per case), write the outputs and return the summary (``scores.json``)."""
        os.makedirs(self.output_dir, exist_ok=True)
        case_rows, slice_rows, example = [], [], None
        start = time.time()
        for i, case in enumerate(self.cases):
            rows, slices, ex = self.score_case(case)
            case_rows += rows
            slice_rows += slices
            if example is None or ex["tumour_pixels"] > example["tumour_pixels"]:
                example = ex
            mine = [r for r in rows if r["method"] == self.methods[0]]
            logger.info(
                f"[{i + 1}/{len(self.cases)}] {ex['case']} ({mine[0]['n_slices']} slices, {time.time() - start:.0f} s): "
                + ", ".join(f"{r['target']} {r['psnr']:.2f} dB / {r['ssim']:.3f}" for r in mine)
                + f" ({self.methods[0]}, paper convention)"
            )
        summary = summarise_rows(case_rows, slice_rows, self.methods)
        summary["settings"] = {"n_cases": len(self.cases), "method": self.method, "baselines": self.baselines}
        write_csv(os.path.join(self.output_dir, "per_case.csv"), case_rows)
        write_csv(os.path.join(self.output_dir, "per_slice.csv"), slice_rows)
        write_json(os.path.join(self.output_dir, "scores.json"), summary, indent=2)
        write_atomic(os.path.join(self.output_dir, "examples.npz"), lambda p: np.savez_compressed(p, **example))
        table = write_table1([summary], self.output_dir)
        logger.info(f"Table 1 written to {self.output_dir}/table1.md\n{table}")
        return summary


def summarise_rows(case_rows: list[dict], slice_rows: list[dict], methods: Sequence[str]) -> dict:
    """``{"methods": {method: {target: {metric: summary}}}}``: paper-convention metrics over all slices, volume
    metrics over cases (:func:`scripts.runtime.metrics.summarise`)."""
    out = {"methods": {}}
    for m in methods:
        out["methods"][m] = {}
        for t in TARGETS:
            slices = [r for r in slice_rows if r["method"] == m and r["target"] == t]
            cases = [r for r in case_rows if r["method"] == m and r["target"] == t]
            entry = {k: summarise([r[k] for r in slices]) for k in SLICE_METRICS}
            entry.update({k: summarise([r[k] for r in cases]) for k in VOLUME_METRICS})
            out["methods"][m][t] = entry
    return out


def _fmt(s: Mapping, digits: int) -> str:
    if s is None or not math.isfinite(s.get("mean", float("nan"))):
        return "n/a"
    text = f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    return text + (f" ({s['n_infinite']} inf)" if s.get("n_infinite") else "")


def _load_summary(item) -> dict:
    if isinstance(item, Mapping):
        return dict(item)
    with open(item) as f:
        return json.load(f)


def _target_rows(methods: Mapping, order: Sequence[str], metrics: Sequence[str]) -> list[str]:
    """One Markdown row per method and target: ``metrics`` as mean ± std (PSNR with 2 decimals, SSIM with 3)."""
    return [
        f"| {METHOD_NAMES.get(m, m)} | {TARGET_NAMES[t]} | "
        + " | ".join(_fmt(methods[m][t][k], 2 if "psnr" in k else 3) for k in metrics) + " |"
        for m in order for t in TARGETS
    ]  # fmt: skip


def _protocol_table(methods: Mapping, order: Sequence[str]) -> list[str]:
    """Markdown lines of the quality-protocol table, and each method's margin over the better trivial baseline."""
    if not all(k in methods[m][t] for m in order for t in TARGETS for k in PROTOCOL_METRICS):
        return []  # summaries written before the protocol existed
    lines = ["", "**Quality protocol** (each volume clipped to its own brain 0.5-99.5 percentiles, brain = T2 above "
             "the 1st percentile of its non-zero voxels; PSNR over the brain; SSIM = mean over axial / sagittal "
             "slices with > 2000 brain voxels; tumour SSIM = axial SSIM maps averaged over tumour voxels; mean ± std "
             "over cases)", "", "| Method | Target | PSNR (dB) | SSIM axial | SSIM sagittal | SSIM tumour |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    lines += _target_rows(methods, order, PROTOCOL_METRICS)
    models = [m for m in order if m not in BASELINES]
    if not models or not all(b in methods for b in BASELINES):
        return lines
    lines += ["", "Margin over the better trivial baseline (T2 or inverted T2, chosen per target and metric; "
              "positive = the synthesis is better):", "",
              "| Method | Target | Δ PSNR (dB) | Δ SSIM axial | Δ SSIM sagittal | Δ SSIM tumour |", "|---|---|---|---|---|---|"]
    for m in models:
        for t in TARGETS:
            cells = []
            for k, digits in zip(PROTOCOL_METRICS, (2, 3, 3, 3)):
                best = max(methods[b][t][k]["mean"] for b in BASELINES)
                delta = methods[m][t][k]["mean"] - best
                cells.append(f"{delta:+.{digits}f}" if math.isfinite(delta) else "n/a")
            lines.append(f"| {METHOD_NAMES.get(m, m)} | {TARGET_NAMES[t]} | " + " | ".join(cells) + " |")
    return lines


def _region_table(methods: Mapping, order: Sequence[str]) -> list[str]:
    """Markdown lines of the tumour / healthy-brain table of the quality protocol (where the tumour-consistency
    loss should show)."""
    if not all(k in methods[m][t] for m in order for t in TARGETS for k in REGION_METRICS):
        return []  # summaries written before these metrics existed
    lines = ["", "**Tumour and healthy brain** (quality protocol; tumour = label > 0, healthy = protocol brain "
             "without tumour; PSNR over the region's voxels, SSIM = axial SSIM maps averaged over them; mean ± std "
             "over cases)", "",
             "| Method | Target | PSNR tumour (dB) | SSIM tumour | PSNR healthy (dB) | SSIM healthy |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    return lines + _target_rows(methods, order, REGION_METRICS)


def write_table1(summaries: Sequence, output_dir: str, paper_reference: bool = True, note: str = "") -> str:
    """Merge ``scores.json`` summaries (paths or dicts; a method met twice keeps its first scores) into
    ``table1.md``, ``table1.csv`` and ``table1.json`` in ``output_dir``; returns the Markdown. ``note``: a paragraph
    put first (e.g. that every ± is a spread over seeds, :func:`scripts.runtime.metrics.merge_over_seeds`)."""
    methods: dict[str, dict] = {}
    for item in summaries:
        for m, scores in _load_summary(item)["methods"].items():
            methods.setdefault(m, scores)
    order = [m for m in METHOD_NAMES if m in methods] + [m for m in methods if m not in METHOD_NAMES]

    head = "| Method | " + " | ".join(f"{TARGET_NAMES[t]} PSNR (dB) | {TARGET_NAMES[t]} SSIM" for t in TARGETS) + " |"
    lines = [note, ""] if note else []
    lines += ["**Paper convention** (2D 128x128 slices kept by the brain filter, each scaled to [0, 1] by its max, "
              "whole slice; mean ± std over slices)", "", head, "|---" * (1 + 2 * len(TARGETS)) + "|"]  # fmt: skip
    for m in order:
        cells = [f"{_fmt(methods[m][t]['psnr'], 2)} | {_fmt(methods[m][t]['ssim'], 3)}" for t in TARGETS]
        lines.append(f"| {METHOD_NAMES.get(m, m)} | " + " | ".join(cells) + " |")
    if paper_reference:
        for name, values in PAPER_TABLE1.items():
            lines.append(f"| *{name}* | " + " | ".join(f"*{values[t][0]:.2f}* | *{values[t][1]:.3f}*" for t in TARGETS) + " |")
    lines += ["", "**Volume convention** (3D, each volume clipped to its 0.5-99.5 percentiles and scaled to [0, 1]; "
              "PSNR/SSIM inside the brain, BraSyn-style SSIM inside the tumour and the healthy brain; mean ± std "
              "over cases)", "", "| Method | Target | PSNR brain (dB) | SSIM brain | SSIM tumour | SSIM healthy |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    lines += _target_rows(methods, order, VOLUME_METRICS[:4])
    lines += _protocol_table(methods, order)
    lines += _region_table(methods, order)
    markdown = "\n".join(lines) + "\n"
    write_text(os.path.join(output_dir, "table1.md"), markdown)
    rows = []
    for m in order:
        for t in TARGETS:
            row = {"method": m, "target": t}
            for k in SLICE_METRICS + VOLUME_METRICS:
                s = methods[m][t].get(k, {})  # summaries from before the protocol lack its metrics
                row[f"{k}_mean"], row[f"{k}_std"] = s.get("mean"), s.get("std")
            rows.append(row)
    write_csv(os.path.join(output_dir, "table1.csv"), rows)
    write_json(os.path.join(output_dir, "table1.json"), {"methods": methods, "order": order}, indent=2)
    return markdown



# --- model selection during training --------------------------------------------------------------------------------

#: What the model selection scores, with the margin over the better baseline each metric is measured against (the
#: project's goal: +3 dB PSNR, +0.05 SSIM over the better trivial baseline, in the quality protocol).
SELECTION_GOALS = {"protocol_psnr": 3.0, "protocol_ssim_axial": 0.05, "protocol_ssim_tumour": 0.05}
SELECTION_NAMES = {"protocol_psnr": "PSNR", "protocol_ssim_axial": "SSIM", "protocol_ssim_tumour": "tumour SSIM"}


def selection_margins(rows: Sequence[Mapping]) -> dict:
    """Per target and metric of :data:`SELECTION_GOALS`: the synthesis's mean over cases, the better baseline's
    mean, and the margin (synthesis - better baseline); ``rows`` as ``per_case.csv``'s (``method`` ``synthesis``,
    ``t2`` or ``inverted_t2``). A metric with no finite value (no tumour in any case) is left out."""
    margins = {}
    for target in TARGETS:
        margins[target] = {}
        for metric in SELECTION_GOALS:
            means = {}
            for method in ("synthesis",) + BASELINES:
                values = [r[metric] for r in rows if r["method"] == method and r["target"] == target]
                means[method] = summarise(values)["mean"]
            if not all(math.isfinite(v) for v in means.values()):
                continue
            baseline = max(BASELINES, key=lambda m: means[m])
            margins[target][metric] = {"synthesis": means["synthesis"], "baseline": baseline,
                                       "baseline_value": means[baseline],
                                       "margin": means["synthesis"] - means[baseline]}
    return margins


def selection_score(margins: Mapping) -> float:
    """How close a synthesis is to the bar "beats the better baseline on every target in every metric": the number
    of (target, metric) pairs where its margin is positive, plus ``(1 + tanh(worst margin in units of its goal)) / 4``
    (:data:`SELECTION_GOALS`) to rank equal counts (it lies in (0, 0.5), so it never overturns a count, and the
    whole part of the score is the count). With the three targets and three metrics, a score of 9 or more means
    every margin is positive; 9.44 or more that the worst one reaches its goal (+3 dB, +0.05 SSIM)."""
    ratios = [m["margin"] / SELECTION_GOALS[metric] for target in margins.values() for metric, m in target.items()]
    if not ratios:
        return float("-inf")
    return sum(r > 0 for r in ratios) + (1 + math.tanh(min(ratios))) / 4


def format_margins(margins: Mapping) -> str:
    """``FLAIR +0.42 dB / +0.031 / -0.012, T1 ...``: each target's PSNR, SSIM and tumour-SSIM margins."""
    parts = []
    for target, metrics in margins.items():
        values = [f"{m['margin']:+.2f} dB" if metric == "protocol_psnr" else f"{m['margin']:+.3f}"
                  for metric, m in metrics.items()]
        parts.append(f"{TARGET_NAMES.get(target, target)} " + " / ".join(values))
    return ", ".join(parts)


class MarginSelection:
    """Choose ``model.pt`` during training by the quality protocol on held-out cases: every ``interval``
    iterations (and when the run ends) the generator synthesises each case's volume as inference does, is scored
    against the real targets (:func:`scripts.runtime.metrics.protocol_scores`) beside the T2 and inverted-T2
    baselines, and ``path`` is written when :func:`selection_score` (the worst margin over the better baseline,
    in units of the goal) is the best so far. The cases should be ones the test set does not hold (e.g. shifted
    phantoms from another seed: ``phantom.py --domain shifted --seed 1``).

    Every pass is appended to ``history`` (JSON: iteration, epoch, margins, score, whether it was saved); with
    ``resume`` the earlier passes are read back, so a resumed run keeps the best model of the run as a whole.

    Args:
        network: the generator being trained (a DDP wrapper is unwrapped).
        dataset_dir: the held-out cases' folder, with its ``datalist.json`` (``prepare_datalist.py``); None: no
            selection (the handler attaches nothing; ``model.pt`` is then :class:`ModelSaver`'s business).
        split: the datalist's split to use (``test`` for a folder prepared with ``--fractions "[0,0,1]"``).
        load_transform: full-resolution loading (as ``evaluate.json``'s); the volumes are loaded once and kept.
        volume_transform: inference preprocessing of the T2 (as ``evaluate.json``'s), inverted after synthesis.
        inferer: a ``BrainSliceInferer``.
        path: the ``model.pt`` to write.
        interval: iterations between passes (<= 0: only at the end).
        history: the JSON file of every pass (None: not kept).
        resume: read ``history`` back first.
        device: where the network runs.
        keep_dir: when given, every pass's generator is also kept there as ``iteration_<n>.pt`` (a generator
            ``model.pt`` each): the same run at several budgets, for the out-of-distribution table.
    """

    def __init__(self, network: torch.nn.Module, dataset_dir: str, split: str, load_transform: Callable,
                 volume_transform: Callable, inferer, path: str, interval: int = 500, history: str | None = None,
                 resume: bool = False, device="cpu", keep_dir: str | None = None):  # fmt: skip
        cases = load_split(os.path.join(dataset_dir, "datalist.json"), split, base_dir=dataset_dir) if dataset_dir else []
        self.network, self.cases = network, list(cases)
        self.load_transform, self.volume_transform, self.inferer = load_transform, volume_transform, inferer
        self.path, self.interval, self.history_path = path, int(interval or 0), history
        self.device = torch.device(device)
        self.keep_dir = keep_dir
        self.history: list[dict] = []
        if resume and history and os.path.isfile(history):
            with open(history) as f:
                self.history = list(json.load(f))
        self._volumes: list | None = None
        self._baselines: list[dict] = []

    @property
    def best(self) -> dict | None:
        """The best pass so far (None before the first)."""
        saved = [h for h in self.history if h.get("saved")]
        return max(saved, key=lambda h: h["score"]) if saved else None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if not self.cases:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return  # rank 0 selects and writes
        if self.interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self._last_pass)

    def _last_pass(self, engine) -> None:
        done = any(h["iteration"] == engine.state.iteration for h in self.history)
        if not done:
            self(engine)
        if not os.path.isfile(self.path):  # the run's passes all lost to an earlier run's best: keep the last
            save_atomic(cpu_weights(self.network), self.path)

    def _load(self) -> list:
        if self._volumes is None:
            self._volumes = []
            for case in self.cases:
                data = self.load_transform(dict(case))
                image, label = torch.as_tensor(data["image"]).float(), torch.as_tensor(data["label"])
                self._volumes.append((case_name(case), image, label[0] > 0))
        return self._volumes

    def rows(self) -> list[dict]:
        """Protocol scores of the synthesis and both baselines, one row per case, method and target."""
        net = getattr(self.network, "module", self.network)
        mode = net.training
        net.eval()
        rows = []
        try:
            for i, (name, image, tumour) in enumerate(self._load()):
                t2 = image[T2_INDEX]
                brain = protocol_brain(t2)
                pred = synthesise_volume(net, image[T2_INDEX : T2_INDEX + 1], self.volume_transform, self.inferer,
                                         self.device)  # fmt: skip
                if i == len(self._baselines):  # the baselines do not change: scored once
                    inverted = (1 - brain_unit(t2, brain)) * (t2 > 0)
                    self._baselines.append({
                        (method, target): protocol_scores(volume, image[k], brain, tumour, metrics=SELECTION_GOALS)
                        for method, volume in (("t2", t2), ("inverted_t2", inverted))
                        for k, target in enumerate(TARGETS)
                    })  # fmt: skip
                for k, target in enumerate(TARGETS):
                    rows.append({"case": name, "method": "synthesis", "target": target,
                                 **protocol_scores(pred[k], image[k], brain, tumour, metrics=SELECTION_GOALS)})
                    rows += [{"case": name, "method": m, "target": target, **self._baselines[i][(m, target)]}
                             for m in BASELINES]
        finally:
            net.train(mode)
        return rows

    def __call__(self, engine) -> None:
        start = time.time()
        margins = selection_margins(self.rows())
        score = selection_score(margins)
        best = self.best
        saved = best is None or score > best["score"]
        if saved:
            save_atomic(cpu_weights(self.network), self.path)
        if self.keep_dir:
            os.makedirs(self.keep_dir, exist_ok=True)
            save_atomic(cpu_weights(self.network), os.path.join(self.keep_dir, f"iteration_{engine.state.iteration}.pt"))
        entry = {"iteration": int(engine.state.iteration), "epoch": int(engine.state.epoch), "score": score,
                 "saved": saved, "seconds": round(time.time() - start, 1), "margins": margins}
        self.history.append(entry)
        if self.history_path:
            write_json(self.history_path, self.history, indent=1)
        logger.info(f"model selection at iteration {entry['iteration']} ({entry['seconds']:.0f} s, "
                    f"{len(self.cases)} held-out cases): margin over the better baseline {format_margins(margins)}; "
                    f"score {score:.3f}" + (f", saved to {self.path}" if saved else
                                               f" (best {self.best['score']:.3f} at iteration "
                                               f"{self.best['iteration']})"))

    def summary(self) -> str:
        """The latest pass in one phrase, for the progress line ("" before the first)."""
        if not self.history:
            return ""
        last, best = self.history[-1], self.best
        text = f"selection at iteration {last['iteration']}: {format_margins(last['margins'])} over the better baseline"
        if best is not None:
            text += f" (best score {best['score']:.3f} at iteration {best['iteration']})"
        return text

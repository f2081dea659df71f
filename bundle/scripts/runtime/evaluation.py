"""The evaluation of a generator checkpoint on a datalist split, against trivial baselines: Table 1 for a paper
generator, a table per scenario for the any-missing one (:func:`evaluation_for` picks it from what the generator
reads).

Driven by ``configs/evaluate.json``, which declares the network, the MONAI transforms and the inferer; this module
runs them case by case (:class:`CaseEvaluation`, the skeleton both share: each case loaded once,
:class:`LoadedCase`) and writes the tables.

**Table 1** (:class:`SynthesisEvaluation`):

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

**Scenarios** (:class:`ScenarioEvaluation`, :data:`SCENARIOS`): each modality missing given the other three, and
the T2 alone -> each target; ``scenarios.md``.
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
from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

from .cases import scenario_mask
from .checkpoints import cpu_weights, save_atomic
from .conventions import CHANNELS, MODALITY_NAMES, SOURCE, T2_INDEX, TARGET_NAMES, TARGETS, VARIANT_NAMES
from .data import case_name, load_split, neighbour_slices
from .downstream import REGIONS, case_dice_3d, check_downstream_ckpt, predict_volume
from .files import write_atomic, write_csv, write_json, write_text
from .metrics import (
    BRASYN_METRICS,
    PROTOCOL_METRICS,
    REGION_METRICS,
    brain_unit,
    brasyn_scores,
    inverted_baseline,
    paper_slice_scores,
    percentile_unit,
    protocol_brain,
    protocol_scores,
    psnr_in_mask,
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


class LoadedCase:
    """One datalist entry as every evaluation reads it: ``name``; ``data`` (``load_transform``'s output); ``image``
    ``(4, H, W, D)`` and ``label`` ``(1, H, W, D)`` at full resolution (RAS); ``image128`` / ``label128``, the
    training preprocessing's slices (with 2.5D context also the kept slices' neighbours); ``keep``, the indices of
    the slices the brain filter kept."""

    def __init__(self, case: Mapping, load_transform: Callable, slice_transform: Callable):
        self.name = case_name(case)
        self.data = load_transform(dict(case))
        self.image = torch.as_tensor(self.data["image"]).float()
        self.label = torch.as_tensor(self.data["label"])
        sliced = slice_transform({"image": self.data["image"], "label": self.data["label"]})
        self.image128 = torch.as_tensor(sliced["image"]).float()
        self.label128 = torch.as_tensor(sliced["label"])
        centre = sliced.get("centre")  # with 2.5D context the sliced volume also holds the kept slices' neighbours
        self.keep = (torch.arange(self.image128.shape[-1]) if centre is None
                     else torch.nonzero(torch.as_tensor(centre)).flatten())  # fmt: skip


class CaseEvaluation:
    """The skeleton every evaluation of a generator shares: the cases of a split, each loaded once
    (:class:`LoadedCase`) and scored by :meth:`score_case` (rows, further rows, an example), one log line per case,
    then the outputs: ``per_case.csv``, ``scores.json`` and ``examples.npz`` (the example with the most tumour),
    and what :meth:`write` adds. :func:`evaluation_for` picks the evaluation of a generator from what it reads."""

    #: the key of an example that says how much tumour it shows (the largest is kept)
    example_size = "tumour_pixels"

    def __init__(self, network, cases, load_transform: Callable, slice_transform: Callable,
                 volume_transform: Callable, inferer, output_dir: str, device="cpu"):  # fmt: skip
        if not cases:
            raise ValueError("no cases to evaluate")
        self.network = network.eval() if network is not None else None
        self.cases = list(cases)
        self.load_transform, self.slice_transform = load_transform, slice_transform
        self.volume_transform = volume_transform
        self.inferer = inferer
        self.output_dir = str(output_dir)
        self.device = torch.device(device)

    def load(self, case: Mapping) -> LoadedCase:
        return LoadedCase(case, self.load_transform, self.slice_transform)

    def score_case(self, case: Mapping) -> tuple[list[dict], list[dict], dict]:
        raise NotImplementedError

    def progress(self, rows: list[dict], example: dict, seconds: float) -> str:
        """The log line of a scored case (after ``[i/n]``)."""
        return f"{example['case']} scored ({seconds:.0f} s)"

    def write(self, rows: list[dict], more: list[dict], summary: dict) -> None:
        """Write what this evaluation adds to the common outputs."""

    def summary(self, rows: list[dict], more: list[dict]) -> dict:
        raise NotImplementedError

    def run(self) -> dict:
        """Score every case (a log line per case), write the outputs and return the summary (``scores.json``)."""
        os.makedirs(self.output_dir, exist_ok=True)
        rows, more, example = [], [], None
        start = time.time()
        for i, case in enumerate(self.cases):
            r, m, ex = self.score_case(case)
            rows += r
            more += m
            if example is None or ex[self.example_size] > example[self.example_size]:
                example = ex
            logger.info(f"[{i + 1}/{len(self.cases)}] " + self.progress(r, ex, time.time() - start))
        summary = self.summary(rows, more)
        write_csv(os.path.join(self.output_dir, "per_case.csv"), rows)
        write_json(os.path.join(self.output_dir, "scores.json"), summary, indent=2)
        write_atomic(os.path.join(self.output_dir, "examples.npz"), lambda p: np.savez_compressed(p, **example))
        self.write(rows, more, summary)
        return summary


class SynthesisEvaluation(CaseEvaluation):
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
        super().__init__(network, cases, load_transform, slice_transform, volume_transform, inferer, output_dir, device)
        self.method = str(method)
        self.baselines = bool(baselines)
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
        c = self.load(case)
        name, image, label, image128, label128, keep = c.name, c.image, c.label, c.image128, c.label128, c.keep
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
            q_preds["inverted_t2"] = inverted_baseline(t2, q_brain).expand(3, -1, -1, -1)

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

    # --- the outputs ------------------------------------------------------------------------------------------------

    def progress(self, rows: list[dict], example: dict, seconds: float) -> str:
        mine = [r for r in rows if r["method"] == self.methods[0]]
        return (f"{example['case']} ({mine[0]['n_slices']} slices, {seconds:.0f} s): "
                + ", ".join(f"{r['target']} {r['psnr']:.2f} dB / {r['ssim']:.3f}" for r in mine)
                + f" ({self.methods[0]}, paper convention)")  # fmt: skip

    def summary(self, rows: list[dict], more: list[dict]) -> dict:
        summary = summarise_rows(rows, more, self.methods)
        summary["settings"] = {"n_cases": len(self.cases), "method": self.method, "baselines": self.baselines}
        return summary

    def write(self, rows: list[dict], more: list[dict], summary: dict) -> None:
        """``per_slice.csv`` and Table 1."""
        write_csv(os.path.join(self.output_dir, "per_slice.csv"), more)
        table = write_table1([summary], self.output_dir)
        logger.info(f"Table 1 written to {self.output_dir}/table1.md\n{table}")


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
    """Per task and metric of :data:`SELECTION_GOALS`: the synthesis's mean over cases, the better baseline's
    mean, and the margin (synthesis - better baseline). ``rows`` as ``per_case.csv``'s: ``target`` names the task
    (a target of the paper's generator, or a scenario of :data:`SCENARIOS`), ``method`` is ``synthesis`` or the
    name of a baseline (``t2`` / ``inverted_t2``; for a scenario, each available modality and its inversion); the
    better baseline is taken per metric over the means. A metric with no finite value (no tumour in any case) is
    left out."""
    margins = {}
    for task in dict.fromkeys(r["target"] for r in rows):
        mine = [r for r in rows if r["target"] == task]
        methods = list(dict.fromkeys(r["method"] for r in mine))
        baselines = [m for m in methods if m != "synthesis"]
        margins[task] = {}
        for metric in SELECTION_GOALS:
            means = {m: summarise([r[metric] for r in mine if r["method"] == m])["mean"] for m in methods}
            if "synthesis" not in means or not baselines or not all(math.isfinite(v) for v in means.values()):
                continue
            baseline = max(baselines, key=lambda m: means[m])
            margins[task][metric] = {"synthesis": means["synthesis"], "baseline": baseline,
                                     "baseline_value": means[baseline],
                                     "margin": means["synthesis"] - means[baseline]}
    return margins


def selection_score(margins: Mapping) -> float:
    """How close a synthesis is to the bar "beats the better baseline on every target in every metric": the number
    of (target, metric) pairs where its margin is positive, plus ``(1 + tanh(worst margin in units of its goal)) / 4``
    (:data:`SELECTION_GOALS`) to rank equal counts (it lies in (0, 0.5), so it never overturns a count, and the
    whole part of the score is the count). With the three targets and three metrics, a score of 9 or more means
    every margin is positive; 9.44 or more that the worst one reaches its goal (+3 dB, +0.05 SSIM). An any-missing
    generator's four "three available -> one missing" scenarios give 12 pairs: 12 or more, every margin positive."""
    ratios = [m["margin"] / SELECTION_GOALS[metric] for target in margins.values() for metric, m in target.items()]
    if not ratios:
        return float("-inf")
    return sum(r > 0 for r in ratios) + (1 + math.tanh(min(ratios))) / 4


def task_name(task: str) -> str:
    """``FLAIR`` for a target, ``T1 (from FLAIR, T1ce, T2)`` for a scenario of :data:`SCENARIOS`."""
    if task in SCENARIOS:
        available, target = SCENARIOS[task]
        return f"{MODALITY_NAMES[target]} (from {', '.join(MODALITY_NAMES[m] for m in available)})"
    return MODALITY_NAMES.get(task, task)


def format_margins(margins: Mapping) -> str:
    """``FLAIR +0.42 dB / +0.031 / -0.012, T1 ...``: each task's PSNR, SSIM and tumour-SSIM margins."""
    parts = []
    for task, metrics in margins.items():
        values = [f"{m['margin']:+.2f} dB" if metric == "protocol_psnr" else f"{m['margin']:+.3f}"
                  for metric, m in metrics.items()]
        parts.append(f"{task_name(task)} " + " / ".join(values))
    return ", ".join(parts)


class MarginSelection:
    """Choose ``model.pt`` during training by the quality protocol on held-out cases: every ``interval``
    iterations (and when the run ends) the generator synthesises each case's volume as inference does, is scored
    against the real targets (:func:`scripts.runtime.metrics.protocol_scores`) beside the trivial baselines, and
    ``path`` is written when :func:`selection_score` (the number of (task, metric) pairs won against the better
    baseline, then the worst margin in units of its goal) is the best so far.

    A generator that reads the T2 alone is scored on each target beside the T2 and the inverted T2; an any-missing
    generator on each "three available -> one missing" scenario (:data:`SELECTION_SCENARIOS`) beside each
    available modality and its inversion (:meth:`rows`). That is one inference per scenario, so a pass costs about
    four times the paper generator's; and the better baseline is taken per metric over the cases' means, where
    :class:`ScenarioEvaluation` picks one per case by brain PSNR. The cases should be ones the test set does not
    hold (e.g. shifted phantoms from another seed: ``phantom.py --domain shifted --seed 1``).

    Every pass is appended to ``history`` (JSON: iteration, epoch, margins, score, whether it was saved); with
    ``resume`` the earlier passes are read back, so a resumed run keeps the best model of the run as a whole.

    Args:
        network: the generator being trained (a DDP wrapper is unwrapped).
        dataset_dir: the held-out cases' folder, with its ``datalist.json`` (``prepare_datalist.py``); None: no
            selection (the handler attaches nothing; ``model.pt`` is then :class:`ModelSaver`'s business).
        split: the datalist's split to use (``test`` for a folder prepared with ``--fractions "[0,0,1]"``).
        load_transform: full-resolution loading (as ``evaluate.json``'s); the volumes are loaded once and kept.
        volume_transform: inference preprocessing of the inputs (as ``evaluate.json``'s), inverted after synthesis.
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
        self._baselines: dict = {}  # (case index, task) -> {baseline: scores}: they do not change, scored once

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
        """Protocol scores of the synthesis and the baselines, one row per case, method and task: for a generator
        that reads the T2 alone, each target beside the T2 and the inverted T2; for an any-missing generator, each
        scenario of :data:`SELECTION_SCENARIOS` (``target`` holds the scenario) beside each available modality
        and its inversion."""
        net = getattr(self.network, "module", self.network)
        mode = net.training
        net.eval()
        try:
            if tuple(getattr(net, "inputs", (SOURCE,))) == (SOURCE,):
                return self._target_rows(net)
            return self._scenario_rows(net)
        finally:
            net.train(mode)

    def _baseline_rows(self, i: int, name: str, task: str, candidates: Callable, real, brain, tumour) -> list[dict]:
        """Rows of the baselines of case ``i`` for ``task``: ``candidates()`` gives ``{method: volume}``, scored
        against ``real`` the first time only."""
        if (i, task) not in self._baselines:
            self._baselines[(i, task)] = {method: protocol_scores(volume, real, brain, tumour, metrics=SELECTION_GOALS)
                                          for method, volume in candidates().items()}  # fmt: skip
        return [{"case": name, "method": m, "target": task, **scores} for m, scores in self._baselines[(i, task)].items()]

    def _target_rows(self, net) -> list[dict]:
        rows = []
        for i, (name, image, tumour) in enumerate(self._load()):
            t2 = image[T2_INDEX]
            brain = protocol_brain(t2)
            pred = synthesise_volume(net, image[T2_INDEX : T2_INDEX + 1], self.volume_transform, self.inferer,
                                     self.device)  # fmt: skip
            baselines = lambda: {"t2": t2, "inverted_t2": inverted_baseline(t2, brain)}  # noqa: E731
            for k, target in enumerate(TARGETS):
                rows.append({"case": name, "method": "synthesis", "target": target,
                             **protocol_scores(pred[k], image[k], brain, tumour, metrics=SELECTION_GOALS)})
                rows += self._baseline_rows(i, name, target, baselines, image[k], brain, tumour)
        return rows

    def _scenario_rows(self, net) -> list[dict]:
        rows = []
        for i, (name, image, tumour) in enumerate(self._load()):
            brain = protocol_brain(image[T2_INDEX])
            # the inference workflow's input: every modality resized and scaled (the unavailable ones are masked
            # by the availability), as ScenarioEvaluation runs it
            x = self.volume_transform({"image": MetaTensor(torch.as_tensor(image).as_subclass(torch.Tensor))})["image"]
            for scenario in SELECTION_SCENARIOS:
                available, target = SCENARIOS[scenario]
                a, k = scenario_mask(available), CHANNELS.index(target)
                with torch.inference_mode():
                    pred = self.inferer(x[None].to(self.device), net, a[None].to(self.device), outputs=[k])[0]
                mask = (image[a] > 0).any(dim=0).float()  # as inference: 0 where no available modality has signal
                pred = to_input_grid(_to_unit(pred.cpu()), x, self.volume_transform)[0] * mask
                rows.append({"case": name, "method": "synthesis", "target": scenario,
                             **protocol_scores(pred, image[k], brain, tumour, metrics=SELECTION_GOALS)})

                def baselines(available=available):  # each available modality, as is and inverted
                    out = {}
                    for m in available:
                        j = CHANNELS.index(m)
                        out[m], out[f"inverted {m}"] = image[j], inverted_baseline(image[j], brain)
                    return out

                rows += self._baseline_rows(i, name, scenario, baselines, image[k], brain, tumour)
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


#: The evaluation scenarios, name -> (available modalities, missing modality); BraSyn's four (one missing, three
#: present) and the paper's T2-only task (one row per target).
SCENARIOS = {
    **{f"missing_{m}": (tuple(c for c in CHANNELS if c != m), m) for m in CHANNELS},
    **{f"t2_only_{t}": ((SOURCE,), t) for t in TARGETS},
}
#: The scenarios :class:`MarginSelection` scores an any-missing generator on: "three available -> one missing".
SELECTION_SCENARIOS = tuple(f"missing_{m}" for m in CHANNELS)


# --- the any-missing generator: a table per scenario, and BraSyn's downstream test ----------------------------------

#: Metrics of the scenario table: the paper's slice convention, then the quality protocol (volume convention).
SCENARIO_METRICS = ("psnr", "ssim", "protocol_psnr", "protocol_ssim_axial", "protocol_ssim_tumour",
                    "protocol_ssim_healthy")  # fmt: skip
#: Columns of ``per_case.csv``.
ROW_KEYS = ("case", "scenario", "target", "method", *SCENARIO_METRICS, *BRASYN_METRICS, "baseline_choice")
#: Rows of the downstream table: the four real modalities, then per missing modality the synthesised and the
#: zero-filled one.
DOWNSTREAM_ROWS = ("real", *(f"{kind}_{m}" for m in CHANNELS for kind in ("synth", "zero")))


class ScenarioEvaluation(CaseEvaluation):
    """Score an any-missing generator per scenario (:data:`SCENARIOS`) against trivial baselines, the paper's
    TC-MGAN on its T2-only scenario, and in BraSyn's downstream form.

    Per case and scenario (available modalities -> one target):

    - ``anymissing``: the generator's synthesis, run as ``inference.json`` runs it (the whole volume at 128x128,
      back to the input grid, 0 where no available modality has signal) for the volume convention, and on the
      brain-filtered 128x128 slices of training for the paper's slice convention;
    - ``baseline``: the best trivial answer, an available modality itself or inverted (1 - x inside the brain),
      chosen per case by brain PSNR (an oracle choice, which favours the baseline), named in ``baseline_choice``;
    - ``paper`` (T2-only scenarios, with ``paper_network``): the paper generator's synthesis of that target.

    Scores: ``psnr`` / ``ssim`` (the paper's per-slice convention, :func:`scripts.runtime.metrics.paper_slice_scores`)
    and the quality protocol (:func:`scripts.runtime.metrics.protocol_scores`: PSNR in the brain, axial SSIM, SSIM
    in the tumour and in the healthy brain), the brain being the real T2's.

    Downstream (with ``downstream_network``, a ``train_downstream.json --inputs real`` segmenter): its 3D Dice of
    TC, WT and ET on the four real modalities, and for each modality on the three others plus that modality
    synthesised from them (``synth_<m>``) or zero-filled (``zero_<m>``).

    Writes to ``output_dir``: ``per_case.csv``, ``downstream_per_case.csv``, ``scores.json``, ``scenarios.md``
    (both tables) and ``examples.npz`` (the axial and sagittal slices through the most tumour of the case with the
    most tumour: the real modalities, the label, every synthesis and every scenario's baseline with its choice;
    ``figures.py anymissing_figure`` draws them).
    """

    def __init__(self, network, cases, load_transform, slice_transform, volume_transform, inferer, output_dir: str,
                 paper_network=None, downstream_network=None, downstream_ckpt: str | None = None, device="cpu"):
        super().__init__(network, cases, load_transform, slice_transform, volume_transform, inferer, output_dir, device)
        if downstream_network is not None and downstream_ckpt:
            check_downstream_ckpt(downstream_ckpt, "real")
        if paper_network is not None:
            want = {"image_size": network.image_size, "intensity_scaling": network.intensity_scaling}
            have = {k: getattr(paper_network, k) for k in want}
            if have != want or paper_network.in_channels > network.context:
                raise ValueError(
                    f"the paper checkpoint's input preparation {have} (in_channels {paper_network.in_channels}) "
                    f"differs from the any-missing model's {want} (context {network.context}); both must be "
                    "scored on the same slices: train them with the same image_size and intensity_scaling"
                )
        self.paper = paper_network.eval() if paper_network is not None else None
        self.downstream = downstream_network.eval() if downstream_network is not None else None

    def _run(self, network, volume: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with torch.inference_mode():
            return self.inferer(volume[None].to(self.device), network, *args, **kwargs)[0].cpu()

    def _to_grid(self, pred128: torch.Tensor, full128, mask: torch.Tensor) -> torch.Tensor:
        """A ``(1, 128, 128, D)`` synthesis in [-1, 1] back on the input grid, [0, 1], 0 outside ``mask``."""
        unit = _to_unit(torch.as_tensor(pred128).as_subclass(torch.Tensor))
        return to_input_grid(unit, full128, self.volume_transform)[0] * mask

    @staticmethod
    def _baseline(image, image128, available, k, q_brain):
        """The best trivial answer for target ``k``: an available modality, as is or inverted, by brain PSNR.
        Returns ``(name, (slices in [-1, 1], volume))``."""
        candidates = {}
        for m in available:
            i = CHANNELS.index(m)
            candidates[m] = (image128[i : i + 1], image[i])
            inverted = inverted_baseline(image[i], q_brain)
            x = image128[i : i + 1]
            candidates[f"inverted {m}"] = (torch.where(x > -1, -x, x), inverted)  # in [-1, 1], 1 - u is -x
        real = brain_unit(image[k], q_brain)  # the protocol's PSNR (protocol_scores), without its SSIM maps
        psnr = {c: psnr_in_mask(brain_unit(v[1], q_brain), real, q_brain) for c, v in candidates.items()}
        choice = max(psnr, key=lambda c: psnr[c] if np.isfinite(psnr[c]) else -np.inf)
        return choice, candidates[choice]

    def _downstream_rows(self, name: str, x: torch.Tensor, label: torch.Tensor, synthesised: Mapping) -> list[dict]:
        """BraSyn's test on the kept slices ``x`` ``(4, h, w, N)``: the four real modalities, then each one replaced
        by its synthesis from the other three (``synthesised[m]`` ``(h, w, N)``) or by zeros."""
        truth = ConvertToMultiChannelBasedOnBratsClasses(et_label=3)(label)
        inputs = {"real": x}
        for i, m in enumerate(CHANNELS):
            synth, zero = x.clone(), x.clone()
            synth[i] = synthesised[m]
            zero[i] = -1.0  # raw 0 after scaling
            inputs[f"synth_{m}"], inputs[f"zero_{m}"] = synth, zero
        rows = []
        for row_name in DOWNSTREAM_ROWS:
            dice = case_dice_3d(predict_volume(self.downstream, inputs[row_name], self.device), truth)
            rows.append({"case": name, "inputs": row_name, **{f"dice_{r}": float(d) for r, d in zip(REGIONS, dice)}})
        return rows

    def score_case(self, case: Mapping) -> tuple[list[dict], list[dict], dict]:
        """Scenario rows, downstream rows and the example views of one datalist entry."""
        c = self.load(case)
        name, image, label, image128, label128, keep = c.name, c.image, c.label, c.image128, c.label128, c.keep
        plain = MetaTensor(torch.as_tensor(image).as_subclass(torch.Tensor))  # a fresh record: only the resize
        full128 = self.volume_transform({"image": plain})["image"]
        t2_index = CHANNELS.index(SOURCE)
        tumour = label[0] > 0
        q_brain = protocol_brain(image[t2_index])
        real128 = _to_unit(image128[..., keep])  # (4, h, w, N)

        # the example views: the axial and the sagittal slice through the most tumour (full grid, RAS)
        z, x0 = int(tumour.sum(dim=(0, 1)).argmax()), int(tumour.sum(dim=(1, 2)).argmax())
        example = {"case": name, "tumour_voxels": int(tumour.sum()), "axial_index": z, "sagittal_index": x0,
                   "label_axial": tumour[..., z].numpy(), "label_sagittal": tumour[x0].numpy()}  # fmt: skip
        for i, m in enumerate(CHANNELS):
            example[f"real_{m}_axial"], example[f"real_{m}_sagittal"] = image[i, ..., z].numpy(), image[i, x0].numpy()

        rows, synthesised, paper = [], {}, {}
        for scenario, (available, target) in SCENARIOS.items():
            a, k = scenario_mask(available), CHANNELS.index(target)
            mask = (image[a] > 0).any(dim=0).float()  # as inference: 0 where no available modality has signal
            ask = {"outputs": [k]}
            avail = a[None].to(self.device)
            preds = {"anymissing": (self._run(self.network, image128, avail, **ask)[..., keep],
                                    self._to_grid(self._run(self.network, full128, avail, **ask), full128, mask))}
            if available != (SOURCE,):  # for the downstream test: background where no input has signal, as inference
                signal = (image128[a][..., keep] > -1).any(dim=0)
                synthesised[target] = torch.where(signal, preds["anymissing"][0][0], torch.tensor(-1.0))
            elif self.paper is not None:
                if not paper:  # all three targets of the paper's generator at once, the first time
                    paper = {"slices": self._run(self.paper, image128[t2_index : t2_index + 1])[..., keep],
                             "volume": self._run(self.paper, full128[t2_index : t2_index + 1])}  # fmt: skip
                j = TARGETS.index(target)
                pfull = self._to_grid(paper["volume"][j : j + 1], full128, mask)
                preds["paper"] = (paper["slices"][j : j + 1], pfull)
            choice, (b128, bvol) = self._baseline(image, image128, available, k, q_brain)
            preds["baseline"] = (b128[..., keep], bvol)
            example[f"baseline_{scenario}_choice"] = choice
            for method, (p128, pvol) in preds.items():
                example[f"{method}_{scenario}_axial"] = pvol[..., z].numpy()
                example[f"{method}_{scenario}_sagittal"] = pvol[x0].numpy()
                slices = _to_unit(p128).permute(3, 0, 1, 2), real128[k : k + 1].permute(3, 0, 1, 2)
                psnr, ssim = paper_slice_scores(*slices)
                row = {"case": name, "scenario": scenario, "target": target, "method": method,
                       "psnr": float(np.mean(psnr.numpy())), "ssim": float(ssim.mean())}  # fmt: skip
                row.update(protocol_scores(pvol, image[k], q_brain, tumour))
                row.update(brasyn_scores(pvol, image[k], tumour))
                row["baseline_choice"] = choice if method == "baseline" else ""
                rows.append({key: row[key] for key in ROW_KEYS})

        down = []
        if self.downstream is not None:
            down = self._downstream_rows(name, image128[..., keep], label128[..., keep], synthesised)
        return rows, down, example

    example_size = "tumour_voxels"

    def summary(self, rows: list[dict], more: list[dict]) -> dict:
        summary = {"scenarios": {}, "downstream": {}, "n_cases": len(self.cases),
                   "paper_variant": self.paper.variant if self.paper is not None else None}
        for scenario in SCENARIOS:
            for method in ("anymissing", "paper", "baseline"):
                mine = [r for r in rows if r["scenario"] == scenario and r["method"] == method]
                if mine:
                    summary["scenarios"].setdefault(scenario, {})[method] = {
                        m: summarise([r[m] for r in mine]) for m in (*SCENARIO_METRICS, *BRASYN_METRICS)}
                    if method == "baseline":
                        choices = sorted({r["baseline_choice"] for r in mine})
                        summary["scenarios"][scenario]["baseline_choices"] = choices
        for row_name in DOWNSTREAM_ROWS:
            mine = [r for r in more if r["inputs"] == row_name]
            if mine:
                summary["downstream"][row_name] = {f"dice_{r}": summarise([row[f"dice_{r}"] for row in mine])
                                                   for r in REGIONS}  # fmt: skip
        return summary

    def write(self, rows: list[dict], more: list[dict], summary: dict) -> None:
        """``downstream_per_case.csv`` and ``scenarios.md``."""
        if more:
            write_csv(os.path.join(self.output_dir, "downstream_per_case.csv"), more)
        text = scenario_tables(summary)
        write_text(os.path.join(self.output_dir, "scenarios.md"), text)
        logger.info(f"written to {self.output_dir}/scenarios.md\n{text}")


def scenario_tables(summary: Mapping) -> str:
    """The scenario table and the downstream table of a :class:`ScenarioEvaluation` summary, as Markdown."""
    paper = VARIANT_NAMES.get(summary.get("paper_variant"), "paper generator")
    names = {"anymissing": "any-missing", "paper": f"{paper} (paper, T2 only)", "baseline": "best trivial baseline"}
    head = ["scenario (available -> target)", "method", "PSNR slice", "SSIM slice", "PSNR brain", "SSIM axial",
            "SSIM tumour", "SSIM healthy"]  # fmt: skip
    lines = [f"Scenarios ({summary['n_cases']} cases; mean ± std over cases; slice = the paper's per-slice "
             "convention, the rest the quality protocol)", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]  # fmt: skip
    for scenario, methods in summary["scenarios"].items():
        available, target = SCENARIOS[scenario]
        label = f"{', '.join(available)} -> {target}"
        for method in ("anymissing", "paper", "baseline"):
            if method not in methods:
                continue
            s = methods[method]
            name = names[method] + (f" ({', '.join(methods['baseline_choices'])})" if method == "baseline" else "")
            cells = [_fmt(s[m], 2 if "psnr" in m else 3) for m in SCENARIO_METRICS]
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    challenge = ["scenario (available -> target)", "method", "SSIM", "SSIM tumour", "SSIM healthy",
                 "SSIM tumour (volume reading)", "SSIM healthy (volume reading)"]  # fmt: skip
    lines += ["", "The BraSyn challenge's 3D SSIM (each volume clipped to its own 0.5 / 99.5 percentiles and scaled to "
              "[0, 1]; torchmetrics' SSIM; tumour / healthy: the SSIM map of the masked volumes averaged in the "
              "region, and the volume reading: the masked volumes' whole-volume score)", "",
              "| " + " | ".join(challenge) + " |", "|" + "---|" * len(challenge)]  # fmt: skip
    for scenario, methods in summary["scenarios"].items():
        available, target = SCENARIOS[scenario]
        for method in ("anymissing", "paper", "baseline"):
            if method in methods and all(m in methods[method] for m in BRASYN_METRICS):
                cells = [_fmt(methods[method][m], 3) for m in BRASYN_METRICS]
                lines.append(f"| {', '.join(available)} -> {target} | {names[method]} | " + " | ".join(cells) + " |")
    if summary.get("downstream"):
        lines += ["", "Downstream (BraSyn form): a segmenter trained on the four real modalities; 3D Dice per case",
                  "", "| inputs | Dice TC | Dice WT | Dice ET |", "|---|---|---|---|"]  # fmt: skip
        for row_name, stats in summary["downstream"].items():
            kind, _, m = row_name.partition("_")
            how = "synthesised" if kind == "synth" else "zero-filled"
            label = "4 real" if kind == "real" else f"3 real + {m} {how}"
            lines.append(f"| {label} | " + " | ".join(_fmt(stats[f"dice_{r}"], 3) for r in ("tc", "wt", "et")) + " |")
    return "\n".join(lines) + "\n"


def evaluation_for(network, cases, load_transform: Callable, slice_transform: Callable, volume_transform: Callable,
                   inferer, output_dir: str, method: str = "tcmgan", baselines: bool = True, paper_network=None,
                   downstream_network=None, downstream_ckpt: str | None = None, device="cpu") -> CaseEvaluation:
    """The evaluation of ``network`` (``evaluate.json``'s ``evaluation``), chosen by what the generator reads
    (its ``inputs``): one that reads the T2 alone, the paper's task, gets Table 1 (:class:`SynthesisEvaluation`:
    T2 -> each target against the T2 and inverted-T2 baselines); one that reads any subset gets every scenario
    (:class:`ScenarioEvaluation`: against the best trivial baseline of the available modalities, the paper generator
    ``paper_network`` on the T2-only scenarios, BraSyn's downstream test with ``downstream_network``).

    Raises:
        ValueError: no cases; or a paper generator given the scenario evaluation's ``paper_network`` or
            ``downstream_ckpt``.
    """
    common = dict(cases=cases, load_transform=load_transform, slice_transform=slice_transform,
                  volume_transform=volume_transform, inferer=inferer, output_dir=output_dir, device=device)
    if network is None or tuple(network.inputs) == (SOURCE,):
        if paper_network is not None or downstream_ckpt:
            raise ValueError("--paper_ckpt and --downstream_ckpt are for an any-missing generator's scenario "
                             "evaluation; the generator of --ckpt_path reads the T2 alone, and its evaluation is Table 1")
        return SynthesisEvaluation(network, method=method, baselines=baselines, **common)
    return ScenarioEvaluation(network, paper_network=paper_network, downstream_network=downstream_network,
                              downstream_ckpt=downstream_ckpt, **common)

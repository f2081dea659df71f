"""The any-missing task: any available subset of FLAIR, T1, T1ce, T2 -> the missing modalities (BraTS "BraSyn").

Not one of the paper's variants: it extends the paper's idea (one generator steered by a label) with a second
label, which modalities are present. The network is :class:`scripts.runtime.networks.AnyMissingNet`; this module
holds what the task adds around it:

- :class:`AvailabilityDraw`: step 1 of a GAN iteration (:class:`scripts.runtime.trainer.TCMGANTrainer`'s ``draw``):
  a target modality and an availability subset per sample;
- :data:`SCENARIOS`: the evaluation scenarios (each modality missing given the other three, and T2 alone), and
  :class:`ScenarioEvaluation`, their tables against the trivial baselines and BraSyn's downstream test.

Inference with whatever a case has goes the one way every generator's does: its cases are
:func:`scripts.runtime.cases.inference_cases`, its loading :class:`scripts.runtime.inference.LoadInputsd` (the one
path of every generator).

Modality order everywhere: :data:`scripts.runtime.conventions.CHANNELS` (FLAIR, T1, T1ce, T2), for the slots, the
availability mask and the labels.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

from .cases import scenario_mask
from .conventions import CHANNELS, SOURCE, TARGETS, VARIANT_NAMES
from .data import case_name
from .downstream import REGIONS, case_dice_3d, check_downstream_ckpt, predict_volume
from .evaluation import _fmt, _to_unit, to_input_grid
from .metrics import brain_unit, paper_slice_scores, protocol_brain, protocol_scores, psnr_in_mask
from .networks import any_missing_input, t2_only

logger = logging.getLogger(__name__)

#: Every non-empty subset of the four modalities, as a ``(15, 4)`` bool table in :data:`CHANNELS` order.
SUBSETS = torch.tensor([bits for bits in itertools.product((False, True), repeat=len(CHANNELS)) if any(bits)])

#: The evaluation scenarios, name -> (available modalities, missing modality); BraSyn's four (one missing, three
#: present) and the paper's T2-only task (one row per target).
SCENARIOS = {
    **{f"missing_{m}": (tuple(c for c in CHANNELS if c != m), m) for m in CHANNELS},
    **{f"t2_only_{t}": ((SOURCE,), t) for t in TARGETS},
}


class AvailabilityDraw:
    """A target modality and the modalities available to synthesise it, per sample.

    The target is uniform over the four modalities. The available subset never holds the target and is never
    empty: with probability ``three`` all three others (BraSyn's scenario), with probability ``t2_alone`` T2 alone
    (the paper's; for a T2 target this share goes to the other subsets), otherwise uniform over the remaining
    subsets. Over many draws every non-empty subset of the other modalities occurs for every target.

    ``draw(image, label, source)`` (the trainer's step 1): ``image`` ``(B, 4, H, W)`` in :data:`CHANNELS` order,
    ``label`` ``(B, 1, H, W)``, ``source`` ``(B, 4 * context, H, W)`` (each modality's neighbouring slices,
    augmented; ``SliceDataset(source="all")``) or None (``image`` itself is the input). Returns
    ``((source, available), condition, k, y, tumour, seg_rows)``: G is called as ``G(source, available, labels=k)``;
    the critic's condition is :func:`any_missing_input` of the centre slices (target slot masked); ``seg_rows`` the
    samples whose target the frozen segmenter knows (FLAIR, T1, T1ce).
    """

    def __init__(self, three: float = 0.35, t2_alone: float = 0.35):
        if min(three, t2_alone) < 0 or three + t2_alone >= 1:
            raise ValueError("three and t2_alone must be >= 0 with a sum below 1")
        m = len(CHANNELS)
        t2 = CHANNELS.index(SOURCE)
        weights = torch.zeros(m, len(SUBSETS))
        for k in range(m):
            valid = ~SUBSETS[:, k]
            others = valid & (SUBSETS.sum(1) == m - 1)
            alone = valid & (SUBSETS.sum(1) == 1) & SUBSETS[:, t2] if k != t2 else torch.zeros_like(valid)
            rest = valid & ~others & ~alone
            weights[k, others] = three
            weights[k, alone] = t2_alone
            weights[k, rest] = (1 - three - weights[k, alone].sum()) / rest.sum()
        self.weights = weights  # (targets, subsets): each row sums to 1
        self.table = SUBSETS

    def subsets(self, k: torch.Tensor) -> torch.Tensor:
        """``(B, 4)`` bool availability for targets ``k`` ``(B,)`` (one ``torch.multinomial`` draw)."""
        if self.weights.device != k.device:  # moved once, not every iteration
            self.weights, self.table = self.weights.to(k.device), self.table.to(k.device)
        return self.table[torch.multinomial(self.weights[k], 1).flatten()]

    def __call__(self, image: torch.Tensor, label: torch.Tensor, source: torch.Tensor | None):
        b, m = image.shape[0], len(CHANNELS)
        k = torch.randint(0, m, (b,), device=image.device)
        available = self.subsets(k)
        x = image if source is None else source
        context = x.shape[1] // m
        centre = x[:, context // 2 :: context]  # each modality's centre slice
        condition = any_missing_input(centre, available, 1)
        y = image[torch.arange(b, device=image.device), k].unsqueeze(1)
        tumour = (label > 0).to(image.dtype)
        return (x, available), condition, k, y, tumour, k < len(TARGETS)


# --- evaluation: a table per scenario, and BraSyn's downstream test -------------------------------------------------

#: Metrics of the scenario table: the paper's slice convention, then the quality protocol (volume convention).
SCENARIO_METRICS = ("psnr", "ssim", "protocol_psnr", "protocol_ssim_axial", "protocol_ssim_tumour",
                    "protocol_ssim_healthy")  # fmt: skip
#: Columns of ``per_case.csv``.
ROW_KEYS = ("case", "scenario", "target", "method", *SCENARIO_METRICS, "baseline_choice")
#: Rows of the downstream table: the four real modalities, then per missing modality the synthesised and the
#: zero-filled one.
DOWNSTREAM_ROWS = ("real", *(f"{kind}_{m}" for m in CHANNELS for kind in ("synth", "zero")))


class ScenarioEvaluation:
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
        if not cases:
            raise ValueError("no cases to evaluate")
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
        self.network = network.eval()
        self.paper = paper_network.eval() if paper_network is not None else None
        self.downstream = downstream_network.eval() if downstream_network is not None else None
        self.cases, self.inferer, self.output_dir = list(cases), inferer, str(output_dir)
        self.load_transform, self.slice_transform = load_transform, slice_transform
        self.volume_transform = volume_transform
        self.device = torch.device(device)

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
            inverted = (1 - brain_unit(image[i], q_brain)) * (image[i] > 0)
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
        name = case_name(case)
        data = self.load_transform(dict(case))
        image, label = torch.as_tensor(data["image"]).float(), torch.as_tensor(data["label"])
        plain = MetaTensor(torch.as_tensor(image).as_subclass(torch.Tensor))  # a fresh record: only the resize
        full128 = self.volume_transform({"image": plain})["image"]
        sliced = self.slice_transform({"image": data["image"], "label": data["label"]})
        image128, label128 = torch.as_tensor(sliced["image"]).float(), torch.as_tensor(sliced["label"])
        centre = sliced.get("centre")  # with 2.5D context the sliced volume also holds the kept slices' neighbours
        keep = torch.arange(image128.shape[-1]) if centre is None else torch.nonzero(torch.as_tensor(centre)).flatten()
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
                row["baseline_choice"] = choice if method == "baseline" else ""
                rows.append({key: row[key] for key in ROW_KEYS})

        down = []
        if self.downstream is not None:
            down = self._downstream_rows(name, image128[..., keep], label128[..., keep], synthesised)
        return rows, down, example

    def run(self) -> dict:
        """Score every case (a log line each), write the outputs, return the summary (``scores.json``)."""
        import time

        from .files import write_atomic, write_csv, write_json, write_text
        from .metrics import summarise

        os.makedirs(self.output_dir, exist_ok=True)
        rows, down, start, example = [], [], time.time(), None
        for i, case in enumerate(self.cases):
            r, d, ex = self.score_case(case)
            rows += r
            down += d
            if example is None or ex["tumour_voxels"] > example["tumour_voxels"]:
                example = ex
            logger.info(f"[{i + 1}/{len(self.cases)}] {r[0]['case']} scored ({time.time() - start:.0f} s)")
        summary = {"scenarios": {}, "downstream": {}, "n_cases": len(self.cases),
                   "paper_variant": self.paper.variant if self.paper is not None else None}
        for scenario in SCENARIOS:
            for method in ("anymissing", "paper", "baseline"):
                mine = [r for r in rows if r["scenario"] == scenario and r["method"] == method]
                if mine:
                    summary["scenarios"].setdefault(scenario, {})[method] = {
                        m: summarise([r[m] for r in mine]) for m in SCENARIO_METRICS}
                    if method == "baseline":
                        choices = sorted({r["baseline_choice"] for r in mine})
                        summary["scenarios"][scenario]["baseline_choices"] = choices
        for row_name in DOWNSTREAM_ROWS:
            mine = [r for r in down if r["inputs"] == row_name]
            if mine:
                summary["downstream"][row_name] = {f"dice_{r}": summarise([row[f"dice_{r}"] for row in mine])
                                                   for r in REGIONS}  # fmt: skip
        write_csv(os.path.join(self.output_dir, "per_case.csv"), rows)
        if down:
            write_csv(os.path.join(self.output_dir, "downstream_per_case.csv"), down)
        write_json(os.path.join(self.output_dir, "scores.json"), summary, indent=2)
        write_atomic(os.path.join(self.output_dir, "examples.npz"), lambda p: np.savez_compressed(p, **example))
        text = scenario_tables(summary)
        write_text(os.path.join(self.output_dir, "scenarios.md"), text)
        logger.info(f"written to {self.output_dir}/scenarios.md\n{text}")
        return summary


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
    if summary.get("downstream"):
        lines += ["", "Downstream (BraSyn form): a segmenter trained on the four real modalities; 3D Dice per case",
                  "", "| inputs | Dice TC | Dice WT | Dice ET |", "|---|---|---|---|"]  # fmt: skip
        for row_name, stats in summary["downstream"].items():
            kind, _, m = row_name.partition("_")
            how = "synthesised" if kind == "synth" else "zero-filled"
            label = "4 real" if kind == "real" else f"3 real + {m} {how}"
            lines.append(f"| {label} | " + " | ".join(_fmt(stats[f"dice_{r}"], 3) for r in ("tc", "wt", "et")) + " |")
    return "\n".join(lines) + "\n"

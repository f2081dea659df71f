"""The report of the paper's study (``reproduce.py``): both tables merged over seeds, the answers to the paper's two
claims (paired differences across seeds, their 95 % intervals, the sign test and a verdict), the Fig. 3-like
figure, and ``R/results.md`` (tables, answers, commands, versions, preset, wall time per stage).

The paper claims (1) the tumour-consistency loss keeps the tumour better (TC-MGAN against MGAN, Table 1 / Fig. 3)
and (2) adding TC-MGAN's synthesised modalities to the T2 helps a tumour segmenter (Table 2). Each seed trains
every model of the study with its own seed, so the seeds pair up: the difference of two models is taken within
each seed, and the spread of those differences across seeds is what a verdict weighs.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

from study_plan import StudyPlan, downstream_name
from study_stages import StageRunner, portable

from scripts.runtime.conventions import MODALITY_NAMES, TARGETS, VARIANT_NAMES
from scripts.runtime.downstream import sanity_check, write_table2
from scripts.runtime.evaluation import write_table1
from scripts.runtime.files import write_json, write_text
from scripts.runtime.metrics import merge_over_seeds  # these at the top, before any stage thread: two in-process
# stages importing MONAI's networks from two threads at once failed with "partially initialized module"

#: The paper's Table 2 (BraTS 2018, whole-tumour Dice per slice; not comparable with phantom results).
PAPER_TABLE2 = {"T2 only": 0.738, "T2 + TC-MGAN synthesised": 0.759, "4 real modalities": 0.814}

#: Two-sided 95 % quantiles of Student's t by degrees of freedom (1 .. 30; beyond, the normal's 1.96).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip

#: Claim 1's quantities: the quality protocol's metrics inside the tumour (metrics.REGION_METRICS).
CLAIM1_METRICS = {"protocol_ssim_tumour": "tumour SSIM", "protocol_psnr_tumour": "tumour PSNR (dB)"}


# --- statistics of paired differences ----------------------------------------------------------------------------------


def sign_test(differences) -> float:
    """Two-sided exact sign test of ``differences`` (zeros left out): the probability, with a fair coin per seed,
    of a split at least as lopsided as the one seen."""
    pos = sum(d > 0 for d in differences)
    neg = sum(d < 0 for d in differences)
    n = pos + neg
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(pos, neg) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(differences) -> dict:
    """Mean, sample standard deviation, 95 % t-interval and sign test of per-seed differences, and the verdict:
    ``supported`` (the interval above 0), ``contradicted`` (below 0), ``not resolved`` (it holds 0), ``needs ≥ 2
    seeds`` (one seed: no spread) or ``no value`` (a seed without a finite score, e.g. no tumour in its slices)."""
    d = [float(x) for x in differences]
    n = len(d)
    finite = n > 0 and all(math.isfinite(x) for x in d)
    mean = sum(d) / n if finite else float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if finite and n > 1 else float("nan")
    low = high = float("nan")
    if finite and n > 1:
        half = (T975[n - 2] if n - 1 <= len(T975) else 1.96) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
    if not finite:
        verdict = "no value"
    elif n < 2:
        verdict = "needs ≥ 2 seeds"
    else:
        verdict = "supported" if low > 0 else "contradicted" if high < 0 else "not resolved"
    return {"differences": d, "n": n, "mean": mean, "std": sd, "ci95": [low, high], "sign_test_p": sign_test(d),
            "positive": sum(x > 0 for x in d), "negative": sum(x < 0 for x in d), "verdict": verdict}  # fmt: skip


# --- the two claims ------------------------------------------------------------------------------------------------------


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _claim1(plan: StudyPlan) -> dict:
    """TC-MGAN (and TC-MGAN bw) against MGAN inside the tumour. Primary quantity (the verdict): the tumour SSIM
    averaged over the three targets, TC-MGAN - MGAN; the per-target SSIM and PSNR rows describe it."""

    loaded = {(k, v): _load(plan.table1_dir(k, v) / "scores.json") for k in range(plan.seeds) for v in plan.variants}

    def score(k, variant, target, metric):
        found = loaded[(k, variant)]
        return found["methods"][variant][target][metric]["mean"] if found else None

    def diffs(variant, metric, targets):
        out = []
        for k in range(plan.seeds):
            pairs = [(score(k, variant, t, metric), score(k, "mgan", t, metric)) for t in targets]
            if any(a is None or b is None for a, b in pairs):
                return None
            out.append(sum(a - b for a, b in pairs) / len(pairs))
        return out

    primary = diffs("tcmgan", "protocol_ssim_tumour", TARGETS)
    if primary is None:
        return {"verdict": "no scores", "rows": []}
    rows = [{"quantity": "tumour SSIM, mean over the targets: TC-MGAN − MGAN (primary)",
             "metric": "protocol_ssim_tumour", **paired(primary)}]  # fmt: skip
    for metric, name in CLAIM1_METRICS.items():
        for t in TARGETS:
            rows.append({"quantity": f"{MODALITY_NAMES[t]} {name}: TC-MGAN − MGAN", "metric": metric,
                         **paired(diffs("tcmgan", metric, [t]))})  # fmt: skip
    bw = diffs("tcmgan_bw", "protocol_ssim_tumour", TARGETS) if "tcmgan_bw" in plan.variants else None
    if bw is not None:
        rows.append({"quantity": "tumour SSIM, mean over the targets: TC-MGAN bw − MGAN",
                     "metric": "protocol_ssim_tumour", **paired(bw)})  # fmt: skip
    return {"statement": "TC-MGAN keeps the tumour better than MGAN", "rows": rows, "verdict": verdict_of(rows[0])}


def _claim2(plan: StudyPlan) -> dict:
    """T2 + TC-MGAN's synthesis against T2 only in the downstream U-Net. Primary quantity: 3D whole-tumour Dice;
    the per-slice Dice (and TC-MGAN bw's synthesis) describe it. Not interpretable unless the sanity check holds:
    4 real - T2 only, paired across seeds, with its interval above 0."""
    scores = _downstream_scores(plan, ("t2", "synth_tcmgan", "synth_tcmgan_bw", "real"))
    if not {"t2", "synth_tcmgan", "real"} <= set(scores):
        return {"verdict": "no scores", "rows": []}

    def diff(a, b, metric):
        return paired([x[metric]["mean"] - y[metric]["mean"] for x, y in zip(scores[a], scores[b])])

    rows = [{"quantity": "WT Dice 3D: T2 + TC-MGAN synthesised − T2 only (primary)", "metric": "dice_wt",
             **diff("synth_tcmgan", "t2", "dice_wt")},
            {"quantity": "WT Dice per slice (reference): T2 + TC-MGAN synthesised − T2 only",
             "metric": "slice_wt_dice", **diff("synth_tcmgan", "t2", "slice_wt_dice")}]  # fmt: skip
    if "synth_tcmgan_bw" in scores:
        rows.append({"quantity": "WT Dice 3D: T2 + TC-MGAN bw synthesised − T2 only", "metric": "dice_wt",
                     **diff("synth_tcmgan_bw", "t2", "dice_wt")})  # fmt: skip
    sanity = downstream_sanity(plan)
    if sanity["verdict"] != "supported":
        verdict = ("not interpretable: the segmenter on the four real modalities is not shown to beat the one on the "
                   "T2 alone (the sanity check), so its inputs are not what limits it at this budget")  # fmt: skip
    else:
        verdict = verdict_of(rows[0])
    return {"statement": "adding TC-MGAN's synthesised modalities to the T2 helps a tumour segmenter", "rows": rows,
            "sanity": sanity, "verdict": verdict}  # fmt: skip


def _downstream_scores(plan: StudyPlan, runs) -> dict:
    """``{run: [scores.json of each seed]}`` for those of ``runs`` that every seed has finished."""
    out = {}
    for r in runs:
        found = [_load(plan.runs_dir(k) / "downstream" / r / "scores.json") for k in range(plan.seeds)]
        if r in plan.downstream and all(found):
            out[r] = found
    return out


def downstream_sanity(plan: StudyPlan) -> dict:
    """Whether the downstream protocol separates its inputs: 4 real − T2 only in 3D WT Dice, paired across seeds
    (:func:`paired`; its verdict ``supported`` = the check passes). Claim 2 and the Table 2 footer both use it."""
    scores = _downstream_scores(plan, ("t2", "real"))
    return {"quantity": "WT Dice 3D: 4 real − T2 only (sanity check)", "metric": "dice_wt",
            **paired([r["dice_wt"]["mean"] - t["dice_wt"]["mean"] for r, t in zip(scores["real"], scores["t2"])])}


def verdict_of(row: dict) -> str:
    """A claim's verdict from its primary quantity's."""
    return {"not resolved": "not resolved at this budget"}.get(row["verdict"], row["verdict"])


def claims(plan: StudyPlan) -> dict:
    """The answers to both claims from the per-seed scores the study wrote. One primary quantity per claim decides
    its verdict (the other rows describe it and are not tested: several tests would make a false "supported" more
    likely); a claim whose models the study did not train is left out with the reason."""
    out = {"seeds": plan.seeds}
    out["claim1"] = (_claim1(plan) if {"mgan", "tcmgan"} <= set(plan.variants) else
                     {"verdict": "not part of this study (it needs MGAN and TC-MGAN)", "rows": []})  # fmt: skip
    out["claim2"] = (_claim2(plan) if "synth_tcmgan" in plan.downstream else
                     {"verdict": "not part of this study (it needs the TC-MGAN downstream run)", "rows": []})  # fmt: skip
    return out


def sanity_sentence(sanity: dict) -> str:
    """The Table 2 footer of a study with several seeds: the paired sanity check of claim 2."""
    ok = sanity["verdict"] == "supported"
    low, high = sanity["ci95"]
    return (f"**Sanity check** {'passed' if ok else 'FAILED'}: 4 real modalities − T2 only in 3D WT Dice, paired "
            f"across {sanity['n']} seeds: {sanity['mean']:+.3f} ± {sanity['std']:.3f}, 95 % interval "
            f"[{low:+.3f}, {high:+.3f}]" + ("." if ok else "; the downstream numbers are not interpretable."))


def claims_markdown(answers: dict) -> str:
    """The claims' section of ``results.md``."""

    def num(x, digits=3):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}"

    lines = [f"Paired across {answers['seeds']} training seed(s): each seed trains every model, the difference is "
             "taken within a seed; mean ± sample std over seeds, the 95 % t-interval, and the exact two-sided sign "
             "test (ties left out; with 3 seeds its smallest p is 0.25, so the interval decides). Each claim's "
             "verdict is its **primary** quantity's: *supported* when the interval lies above 0, *contradicted* "
             "below 0, otherwise *not resolved at this budget*; the other rows describe it and are not tested.",
             ""]  # fmt: skip
    for key, title in (("claim1", "Claim 1: the tumour-consistency loss keeps the tumour better"),
                       ("claim2", "Claim 2: synthesised modalities help a tumour segmenter")):  # fmt: skip
        claim = answers[key]
        lines += [f"**{title}** — verdict: **{claim['verdict']}**", ""]
        rows = claim.get("rows", []) + ([claim["sanity"]] if "sanity" in claim else [])
        if rows:
            lines += ["| quantity | per seed | mean ± std | 95 % interval | seeds + / − (sign test p) | verdict |",
                      "|---|---|---|---|---|---|"]  # fmt: skip
            for i, r in enumerate(rows):
                digits = 2 if "psnr" in r["metric"] else 3
                tested = i == 0 or "sanity" in r["quantity"]
                lines.append(
                    f"| {r['quantity']} | {', '.join(num(d, digits) for d in r['differences'])} | "
                    f"{num(r['mean'], digits)} ± {num(r['std'], digits).lstrip('+')} | "
                    f"[{num(r['ci95'][0], digits)}, {num(r['ci95'][1], digits)}] | "
                    f"{r['positive']} / {r['negative']} ({r['sign_test_p']:.2f}) | "
                    f"{r['verdict'] if tested else '(descriptive)'} |"
                )
            lines.append("")
    return "\n".join(lines)


# --- have the trainings converged? ----------------------------------------------------------------------------------------


def validation_curves(plan: StudyPlan) -> dict:
    """Each training stage's validation history (``validation.json`` of its run), per seed: ``{title: {"metric":
    key metric, "seeds": [[(epoch, value), ...] per seed]}}``, in plan order (segmenter, GANs, downstream U-Nets)."""
    folders = {"segmenter S": "segmenter", **{f"GAN {VARIANT_NAMES.get(v, v)}": v for v in plan.variants},
               **{f"U-Net {downstream_name(r)}": f"downstream/{r}" for r in plan.downstream}}  # fmt: skip
    curves = {}
    for title, folder in folders.items():
        metric, seeds = None, []
        for k in range(plan.seeds):
            record = _load(plan.runs_dir(k) / folder / "validation.json") or {}
            metric = record.get("key_metric", metric)
            seeds.append([(h["epoch"], h[metric]) for h in record.get("history", []) if metric in h])
        if any(seeds):
            curves[title] = {"metric": metric, "seeds": seeds}
    return curves


def flattened(points, share: float = 0.1) -> tuple[str, float]:
    """Whether a validation curve has flattened: the mean of its last third of epochs against the mean of the third
    before, as a share of the curve's whole range. Returns (``flattened`` | ``still rising`` | ``still falling`` |
    ``too short``, that change); still moving when the last third moves by more than ``share`` of the range."""
    values = [v for _, v in points if math.isfinite(v)]
    if len(values) < 3:
        return "too short", float("nan")
    third = max(1, len(values) // 3)
    last, before = values[-third:], values[-2 * third : -third]
    gain = sum(last) / len(last) - sum(before) / len(before)
    spread = max(values) - min(values)
    if spread > 0 and abs(gain) > share * spread:
        return ("still rising" if gain > 0 else "still falling"), gain
    return "flattened", gain


def curves_markdown(curves: dict) -> str:
    """The convergence table of ``results.md``: per training stage and seed, flattened or still rising."""
    lines = ["| training | key metric | epochs | per seed: last third − third before (verdict) |", "|---|---|---|---|"]
    for title, curve in curves.items():
        cells = []
        for points in curve["seeds"]:
            verdict, gain = flattened(points)
            cells.append(f"{gain:+.3f} ({verdict})" if math.isfinite(gain) else verdict)
        epochs = max((len(p) for p in curve["seeds"]), default=0)
        lines.append(f"| {title} | {curve['metric']} | {epochs} | {'; '.join(cells)} |")
    return "\n".join(lines)


# --- the in-process stages -----------------------------------------------------------------------------------------------


def seed_note(plan: StudyPlan) -> str:
    if plan.seeds == 1:
        return ""
    return (f"**{plan.seeds} training seeds**: every cell is the mean ± the standard deviation *over seeds* of "
            "the per-seed means (the per-seed tables, whose ± are over cases or slices, are in the seed "
            "folders).")  # fmt: skip


def merge_table1(plan: StudyPlan) -> list:
    per_variant = []
    for v in plan.variants:
        summaries = [json.loads((plan.table1_dir(k, v) / "scores.json").read_text()) for k in range(plan.seeds)]
        per_variant.append(merge_over_seeds(summaries) if plan.seeds > 1 else summaries[0])
    write_table1(per_variant, str(plan.root / "table1"), note=seed_note(plan))
    return []


def merge_table2(plan: StudyPlan) -> list:
    rows = {}
    for r in plan.downstream:
        summaries = [json.loads((plan.runs_dir(k) / "downstream" / r / "scores.json").read_text())
                     for k in range(plan.seeds)]  # fmt: skip
        rows[downstream_name(r)] = merge_over_seeds(summaries) if plan.seeds > 1 else summaries[0]
    if plan.seeds > 1:  # the paired check of claim 2, so that the report says one thing
        sentence = sanity_sentence(downstream_sanity(plan))
    else:
        _, sentence = sanity_check(rows[downstream_name("t2")], rows[downstream_name("real")])
    write_table2(rows, str(plan.root / "table2"), note=seed_note(plan), footer=sentence)
    return []


def report(plan: StudyPlan, runner: StageRunner, order: list[str]) -> list:
    """The figure, ``claims.json`` and ``results.md``; ``order``: the stage names in plan order."""
    from figures import comparison_figure, curves_figure

    examples = {v: str(plan.table1_dir(0, v) / "examples.npz") for v in plan.variants}
    names = {**VARIANT_NAMES, "recommended": "recommended"}
    figure = comparison_figure(examples, str(plan.root / "figure3.png"), names=names)
    curves = validation_curves(plan)
    if curves:
        curves_figure(curves, str(plan.root / "curves.png"))
    answers = claims(plan)
    write_json(str(plan.root / "claims.json"), answers, indent=2)
    write_text(str(plan.root / "results.md"),
               results_markdown(plan, runner, order, Path(figure).name, answers, curves))  # fmt: skip
    return []


def segmenter_summary(plan: StudyPlan) -> str:
    """S's validation Dice (``validation.json`` of each seed's segmenter run): last and best epoch."""
    import numpy as np

    last, best = [], []
    for k in range(plan.seeds):
        path = plan.runs_dir(k) / "segmenter" / "validation.json"
        if not path.is_file():
            return f"No validation record at `{path}` (a run from before the bundle kept one)."
        record = json.loads(path.read_text())
        key = record["key_metric"]
        last.append(record["last"].get(key, float("nan")))
        best.append((record.get("best") or {}).get(key, float("nan")))  # no finite value: no best

    def cell(values):
        return f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f} over {len(values)} seeds"
                                           if len(values) > 1 else "")  # fmt: skip

    return (f"Validation Dice (`{key}`, on the first {plan.p['val_num_cases']} `seg` cases) at the last epoch "
            f"{cell(last)}, at its best epoch {cell(best)}; `model.pt` holds the best epoch.")


def results_markdown(plan: StudyPlan, runner: StageRunner, order: list[str], figure: str, answers: dict,
                     curves: dict | None = None) -> str:  # fmt: skip
    import monai
    import torch

    position = {name: i for i, name in enumerate(order)}
    stages = sorted(runner.records(), key=lambda s: position.get(s["stage"], len(position)))
    device = plan.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    seeds = "" if plan.seeds == plan.p.get("seeds", 1) else f" --seeds {plan.seeds}"
    lines = [
        f"# Reproduction of TC-MGAN (preset `{plan.preset}`)", "",
        f"Data: {'user data set ' + portable([str(plan.data)]) if plan.user_data else 'phantom set made by the study'}"
        f"; splits from `{portable([str(plan.data / 'datalist.json')])}`.", "",
        "Command:", "", "    " + portable(["python", "tools/reproduce.py", "--preset", plan.preset, "--output_dir",
                                          str(plan.root), *seeds.split()]
                                         + (["--dataset_dir", str(plan.data)] if plan.user_data else [])), "",
        "## Settings", "", "```json", json.dumps(plan.p, indent=1), "```", "",
        f"Versions: Python {platform.python_version()}, torch {torch.__version__}, MONAI {monai.__version__}; "
        f"machine {platform.machine()}, {os.cpu_count()} CPUs, device {device}, GPU {gpu}.", "",
        "## Segmenter S (the frozen tumour segmenter of TC-MGAN)", "", segmenter_summary(plan), "",
        "## Table 1: synthesis quality (test split)", "", (plan.root / "table1" / "table1.md").read_text(), "",
        "## Table 2: downstream tumour segmentation (test split)", "",
        (plan.root / "table2" / "table2.md").read_text(), "",
        "The paper's Table 2 (BraTS 2018, reference per-slice whole-tumour Dice; not comparable with phantom "
        "results): " + ", ".join(f"{k} {v:.3f}" for k, v in PAPER_TABLE2.items()) + ".", "",
        "## The paper's two claims", "", claims_markdown(answers), "",
        "## Have the trainings converged?", "",
        "Each training's validation curve (`curves.png`): the mean of its last third of epochs against the third "
        "before; *still rising* (or *falling*) when it moves by more than a tenth of the curve's range, i.e. a "
        "longer schedule would probably change the numbers above.", "", curves_markdown(curves or {}), "",
        "![validation curves of every training, one line per seed](curves.png)" if curves else "", "",
        "## Figure", "", f"![T2, each method's synthesis and the real image, tumour contour]({figure})", "",
        "## Stages", "", "| stage | wall time (s) | commands |", "|---|---|---|",
    ]  # fmt: skip
    for s in stages:
        cmds = "<br>".join(f"`{c}`" for c in s["commands"]) or "(in-process)"
        lines.append(f"| {s['stage']} | {s['wall_s']} | {cmds} |")
    total = sum(s["wall_s"] for s in stages)
    lines += ["", f"Total wall time of the recorded stages: {total:.0f} s ({total / 60:.1f} min)"
              + (f"; they ran {runner.jobs} at a time, and this run took {time.time() - runner.started:.0f} s up "
                 "to this report" if runner.jobs > 1 else "") + ".", ""]  # fmt: skip
    return "\n".join(lines)

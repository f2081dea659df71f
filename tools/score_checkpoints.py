"""Score generator checkpoints on held-out cases in the quality protocol, against the trivial baselines: the pass
that chooses ``model.pt`` during training (``scripts.runtime.evaluation.MarginSelection``: brain PSNR, axial SSIM
and tumour SSIM of each target, each beside the better of the T2 and the inverted T2; for an any-missing generator
of each "three available -> one missing" scenario), run on any set of cases and any number of checkpoints, the
volumes and the baselines computed once. About 2 minutes per paper checkpoint on 8 full-size cases on 2 CPU cores
(an any-missing one runs once per scenario: about four times that), where ``evaluate.json`` (both conventions,
every metric) takes 15-30.

    python tools/score_checkpoints.py --dataset_dir data/ood8 \\
        --checkpoints "[runs/a/recommended/model.pt,runs/b/recommended/model.pt]" --output runs/scores.json

``--views all`` / ``--flip true`` score the tri-planar / mirrored synthesis of each checkpoint instead of the axial one.

Prints one Markdown table (checkpoint, target or scenario; each metric as synthesis / better baseline / margin) and writes the
margins of every checkpoint to ``--output`` (JSON). The checkpoints must share the image size and intensity
scaling of ``train.json``'s defaults (128, ``volume``), as every model of the bundle's recipes does.
"""

from __future__ import annotations

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bundle"))


def score(dataset_dir: str, checkpoints, output: str = "", split: str = "test", device: str = "cpu",
          views="axial", flip: bool = False) -> dict:
    """Margins of each checkpoint (``{path: {"margins": ..., "score": ...}}``); see the module doc. ``views`` and
    ``flip``: the synthesis scored (``BrainSliceInferer``'s: e.g. ``--views all`` for a tri-planar generator,
    ``--flip true`` for the mirrored passes averaged in)."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from scripts.runtime.checkpoints import load_model, read_model
    from scripts.runtime.command_line import flag
    from scripts.runtime.evaluation import (SELECTION_GOALS, MarginSelection, format_margins, selection_margins,
                                            selection_score, task_name)
    from scripts.runtime.files import write_json
    from scripts.runtime.inference import BrainSliceInferer

    if isinstance(checkpoints, str):
        checkpoints = [c for c in checkpoints.strip("[]").split(",") if c]
    parser = ConfigParser()
    parser.read_config(os.path.join(REPO, "bundle", "configs", "train.json"))
    for path in checkpoints:
        arch = read_model(path)  # a paper or an any-missing generator
        if (arch["image_size"], arch["intensity_scaling"]) != (parser["image_size"], parser["intensity_scaling"]):
            raise ValueError(f"{path}: image size {arch['image_size']}, scaling {arch['intensity_scaling']}; this "
                             f"tool scores {parser['image_size']}, {parser['intensity_scaling']} models only")
    parser.update({"bundle_root": os.path.join(REPO, "bundle"), "dataset_dir": dataset_dir})
    load = Compose(parser.get_parsed_content("load_transforms"))
    volume = Compose(parser.get_parsed_content("image_transforms"))
    inferer = BrainSliceInferer(sw_batch_size=32, views=views, flip=flag(flip, "flip"))
    selection = MarginSelection(load_model(checkpoints[0], device), dataset_dir, split, load, volume, inferer,
                                path=os.devnull, interval=0, device=device)
    results, lines = {}, []
    for path in checkpoints:
        start = time.time()
        selection.network = load_model(path, device)
        margins = selection_margins(selection.rows())
        results[path] = {"margins": margins, "score": selection_score(margins), "cases": len(selection.cases)}
        print(f"{path} ({time.time() - start:.0f} s): {format_margins(margins)}; score {results[path]['score']:+.3f}",
              flush=True)
        for target, metrics in margins.items():
            cells = [(f"{m['synthesis']:.3f} / {m['baseline_value']:.3f} ({m['baseline']}) / {m['margin']:+.3f}"
                      if m else "n/a") for m in (metrics.get(metric) for metric in SELECTION_GOALS)]
            lines.append(f"| {path} | {task_name(target)} | " + " | ".join(cells) + " |")
    print("\n| checkpoint | target or scenario | PSNR (dB): synthesis / better baseline / margin | SSIM axial | SSIM tumour |")
    print("|---|---|---|---|---|")
    print("\n".join(lines))
    if output:
        write_json(output, results, indent=1)
    return results


if __name__ == "__main__":
    from scripts.runtime.command_line import run_tool

    run_tool(score, serialize=lambda result: None)

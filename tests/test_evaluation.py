"""Specification of Table 1: bundle/configs/evaluate.json (over train.json) and bundle/scripts/runtime/evaluation.py
end to end on the phantom set, its table writer, and that its volume synthesis is the inference workflow's.

(The metrics it computes are specified in ``test_metrics.py``.)
"""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
from conftest import SMALL_MIN_PIXELS, error_chain, run_workflow

from scripts.runtime.data import case_name
from scripts.runtime.evaluation import BASELINES, write_table1
from scripts.runtime.networks import TARGETS


@pytest.fixture(scope="module")
def evaluation_run(phantom_dir, generator_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("table1")
    wf = run_workflow(
        "evaluate.json", workflow_type="eval", dataset_dir=str(phantom_dir), ckpt_path=str(generator_ckpt),
        output_dir=str(out), min_brain_pixels=SMALL_MIN_PIXELS,
    )  # fmt: skip
    return out, wf


def test_evaluate_writes_table1_for_the_method_and_the_baselines(evaluation_run):
    out, _ = evaluation_run
    for name in ("per_case.csv", "per_slice.csv", "scores.json", "table1.md", "table1.csv", "table1.json", "examples.npz"):
        assert (out / name).is_file(), name
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["methods"]) == {"mgan", *BASELINES}
    assert scores["settings"]["n_cases"] == 2
    for method, per_target in scores["methods"].items():
        assert set(per_target) == set(TARGETS)
        for target, metrics in per_target.items():
            assert metrics["ssim"]["n"] > 10  # slices of the 2 test cases
            assert 0 <= metrics["ssim"]["mean"] <= 1 and math.isfinite(metrics["psnr"]["mean"])
            assert metrics["psnr_brain"]["n"] == 2 and 0 <= metrics["ssim_tumour"]["mean"] <= 1
    # the T2 baseline against FLAIR is far better than an untrained generator
    assert scores["methods"]["t2"]["flair"]["psnr"]["mean"] > scores["methods"]["mgan"]["flair"]["psnr"]["mean"] + 5
    table = (out / "table1.md").read_text()
    assert "| MGAN |" in table and "| T2 (baseline) |" in table and "paper, BraTS18" in table
    assert "**Tumour and healthy brain**" in table and "| PSNR tumour (dB) | SSIM tumour | PSNR healthy (dB) |" in table
    for key in ("protocol_psnr_tumour", "protocol_psnr_healthy", "protocol_ssim_healthy"):
        assert scores["methods"]["mgan"]["flair"][key]["n"] == 2  # both test cases have a tumour
    rows = (out / "per_case.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 3 * 3  # header + cases x methods x targets
    example = np.load(out / "examples.npz")
    assert example["pred_mgan"].shape == example["real"].shape == (3, 128, 128)


def test_volume_synthesis_is_the_inference_workflow(evaluation_run, phantom_dir, generator_ckpt, tmp_path):
    """The volume-convention scores look at exactly what inference.json writes in fp32 (evaluation scores in fp32;
    inference's default on a bf16 CPU differs from it within the 45 dB bar, test_throughput.py)."""
    _, wf = evaluation_run
    evaluation = wf.parser.get_parsed_content("evaluation")
    case = evaluation.cases[0]
    data = evaluation.load_transform(dict(case))
    mine = evaluation._synthesise_volume(data["image"][3:4])
    run_workflow(
        "inference.json", workflow_type="inference", dataset_dir=str(phantom_dir), ckpt_path=str(generator_ckpt),
        output_dir=str(tmp_path), precision="fp32",
    )  # fmt: skip
    for k, target in enumerate(TARGETS):
        written = nib.as_closest_canonical(nib.load(str(tmp_path / f"{case_name(case)}_{target}.nii.gz")))
        assert np.abs(np.asarray(written.dataobj) - mine[k].numpy()).max() < 1e-5  # mine is on the RAS grid


def test_write_table1_merges_runs_and_keeps_the_first_baselines(evaluation_run, tmp_path):
    out, _ = evaluation_run
    first = json.loads((out / "scores.json").read_text())
    second = {"methods": {"tcmgan": first["methods"]["mgan"], "t2": {t: {} for t in TARGETS}}}
    markdown = write_table1([first, second], str(tmp_path))
    assert markdown.index("| MGAN |") < markdown.index("| TC-MGAN |") < markdown.index("| T2 (baseline) |")
    merged = json.loads((tmp_path / "table1.json").read_text())
    assert merged["methods"]["t2"] == first["methods"]["t2"]


def test_evaluate_without_baselines_and_bad_checkpoint(phantom_dir, generator_ckpt, tmp_path):
    run_workflow(
        "evaluate.json", workflow_type="eval", dataset_dir=str(phantom_dir), ckpt_path=str(generator_ckpt),
        output_dir=str(tmp_path / "a"), min_brain_pixels=SMALL_MIN_PIXELS, baselines=False, max_cases=1,
    )  # fmt: skip
    assert set(json.loads((tmp_path / "a" / "scores.json").read_text())["methods"]) == {"mgan"}
    with pytest.raises(Exception) as info:
        run_workflow("evaluate.json", dataset_dir=str(phantom_dir), ckpt_path=str(tmp_path / "no_such.pt"),
                     output_dir=str(tmp_path / "b"))  # fmt: skip
    # MONAI wraps the reader's error; the root names the file
    messages = [f"{type(error).__name__}: {error}" for error in error_chain(info.value)]
    assert any(m.startswith("FileNotFoundError") and "no_such.pt" in m for m in messages), messages
    assert not (tmp_path / "b" / "scores.json").exists()

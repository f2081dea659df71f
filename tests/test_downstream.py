"""Specification of downstream segmentation (Table 2): bundle/scripts/runtime/downstream.py and the
train_downstream.json / evaluate_downstream.json overlays: the Dice scores by hand, the input selection, the model
record, the table, and the train -> evaluate -> table chain on the phantom set."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import TINY, error_chain, run_workflow
from monai.transforms import ConvertToMultiChannelBasedOnBratsClassesd

from scripts.runtime.checkpoints import load_checkpoint, load_model
from scripts.runtime.downstream import (
    ET_LABEL,
    REGIONS,
    DownstreamInputsd,
    case_dice_3d,
    downstream_info,
    slice_wt_dice,
    write_table2,
)


def masks(*slices):
    """(N, H, W) masks from nested lists."""
    return torch.tensor(slices, dtype=torch.float32)


# --- per-slice reference Dice -----------------------------------------------------------------------------------------


SLICE_DICE = {
    # case: (prediction, truth, the Dice of the one slice)
    "identical_masks_is_one": (masks([[1, 1, 0], [0, 1, 0]]), masks([[1, 1, 0], [0, 1, 0]]), 1.0),
    "empty_prediction_on_empty_slice_is_one": (torch.zeros(1, 3, 3), torch.zeros(1, 3, 3), 1.0),
    # |P| = 4, |G| = 2, no overlap: (2*0 + 1) / (4 + 2 + 1)
    "disjoint_masks_has_plus_one_smoothing": (masks([[1, 1, 0], [1, 1, 0]]), masks([[0, 0, 1], [0, 0, 1]]),
                                              pytest.approx(1 / 7)),
    # |P| = 3, |G| = 2, |P ∩ G| = 1: (2*1 + 1) / (3 + 2 + 1)
    "partial_overlap": (masks([[1, 1, 1], [0, 0, 0]]), masks([[0, 0, 1], [0, 0, 1]]), pytest.approx(0.5)),
    "thresholds_probabilities_at_half": (masks([[0.6, 0.4]]), masks([[1, 0]]), 1.0),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SLICE_DICE))
def test_slice_dice_of_one_slice(case):
    pred, true, expected = SLICE_DICE[case]
    assert slice_wt_dice(pred, true).tolist() == [expected]


def test_slice_dice_is_per_slice_and_averages():
    pred = masks([[1, 1], [1, 1]], [[1, 1], [1, 1]])
    true = masks([[1, 1], [1, 1]], [[0, 0], [0, 0]])
    per_slice = slice_wt_dice(pred, true)
    assert per_slice.tolist() == pytest.approx([1.0, 1 / 5])  # second: (0 + 1) / (4 + 0 + 1)
    assert per_slice.mean().item() == pytest.approx(0.6)


# --- per-case 3D Dice (MONAI) -----------------------------------------------------------------------------------------


def test_3d_dice_conventions_for_empty_regions():
    """Regions (TC, WT, ET): empty truth + empty prediction -> 1; empty truth + a predicted voxel -> 0; otherwise
    the plain Dice (no smoothing)."""
    pred = torch.zeros(3, 2, 2, 2)
    true = torch.zeros(3, 2, 2, 2)
    pred[1, 0, :, :] = 1  # WT: 4 predicted voxels
    true[1, :, 0, :] = 1  # 4 true voxels, 2 in common
    pred[2, 1, 1, 1] = 1  # ET: one voxel predicted, none true
    assert case_dice_3d(pred, true).tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_label_regions_follow_the_declared_order():
    label = torch.tensor([0, 1, 2, 3]).reshape(1, 4, 1, 1)  # background, necrosis, oedema, enhancing
    regions = ConvertToMultiChannelBasedOnBratsClassesd(keys="label", et_label=ET_LABEL)({"label": label})["label"]
    expected = {"wt": [0, 1, 1, 1], "tc": [0, 1, 0, 1], "et": [0, 0, 0, 1]}
    for i, region in enumerate(REGIONS):
        assert regions[i].flatten().int().tolist() == expected[region], region


# --- input selection --------------------------------------------------------------------------------------------------


def volume(depth=3, size=128):
    torch.manual_seed(1)
    return {"image": torch.rand(4, size, size, depth) * 2 - 1}


def test_t2_input_keeps_only_the_t2_channel():
    data = volume()
    out = DownstreamInputsd(inputs="t2")(data)["image"]
    assert out.shape == (1, 128, 128, 3)
    torch.testing.assert_close(out[0], data["image"][3])


def test_real_input_keeps_four_channels():
    data = volume()
    out = DownstreamInputsd(inputs="real")(data)["image"]
    torch.testing.assert_close(out, data["image"])


def test_synth_input_is_generator_output_plus_t2(generator_ckpt):
    data = volume()
    out = DownstreamInputsd(inputs="synth", synth_ckpt=str(generator_ckpt), batch_size=2)(data)["image"]
    assert out.shape == (4, 128, 128, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out[3], data["image"][3])
    with torch.no_grad():
        expected = load_model(str(generator_ckpt))(data["image"][3:].permute(3, 0, 1, 2))  # (D, 3, H, W)
    torch.testing.assert_close(out[:3], expected.permute(1, 2, 3, 0))
    assert out.abs().max() <= 1


def test_input_option_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="unknown inputs 'flair'"):
        DownstreamInputsd(inputs="flair")
    with pytest.raises(ValueError, match="synth_ckpt"):
        DownstreamInputsd(inputs="synth")
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        DownstreamInputsd(inputs="synth", synth_ckpt=str(missing))
    with pytest.raises(ValueError, match="4-channel"):
        DownstreamInputsd(inputs="t2")({"image": torch.zeros(3, 8, 8, 2)})


def test_downstream_info_refuses_a_generator(generator_ckpt):
    with pytest.raises(ValueError, match="not a downstream segmenter"):
        downstream_info(str(generator_ckpt))


# --- Table 2 ----------------------------------------------------------------------------------------------------------


def fake_scores(value):
    stat = {"mean": value, "std": 0.1}
    return {"n_cases": 2, "n_slices": 50, "slice_wt_dice": stat, "dice_wt": stat, "dice_tc": stat, "dice_et": stat}


def test_table2_has_one_row_per_input(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(fake_scores(0.75)))
    md = write_table2({"T2 only": str(path), "4 real": fake_scores(0.8)}, str(tmp_path / "table"))
    lines = md.strip().splitlines()
    assert lines[0] == "| Input | WT Dice per slice (reference) | WT 3D | TC 3D | ET 3D |"
    assert lines[2] == "| T2 only | 0.750 ± 0.100 | 0.750 ± 0.100 | 0.750 ± 0.100 | 0.750 ± 0.100 |"
    assert lines[3].startswith("| 4 real | 0.800 ± 0.100 |") and len(lines) == 4
    assert (tmp_path / "table" / "table2.md").read_text() == md
    rows = list(csv.DictReader(open(tmp_path / "table" / "table2.csv")))
    assert [r["input"] for r in rows] == ["T2 only", "4 real"] and float(rows[1]["dice_et_mean"]) == 0.8
    with pytest.raises(FileNotFoundError, match="missing.json"):
        write_table2({"x": str(tmp_path / "missing.json")}, str(tmp_path))


# --- train -> evaluate -> table on the phantom set --------------------------------------------------------------------


def _train_and_evaluate(phantom_dir, out, **inputs):
    run_workflow("train_downstream.json", dataset_dir=str(phantom_dir), output_dir=str(out), **inputs, **TINY)
    name = inputs.get("run_name", inputs.get("inputs", "t2"))
    run_workflow(
        "evaluate_downstream.json", workflow_type=None, dataset_dir=str(phantom_dir), output_dir=str(out),
        run_name=name, min_brain_pixels=TINY["min_brain_pixels"], cache_num_workers=0,
    )
    return out / "downstream" / name


def test_train_evaluate_and_table(phantom_dir, generator_ckpt, tmp_path):
    runs = {
        "T2 only": _train_and_evaluate(phantom_dir, tmp_path, inputs="t2"),
        "T2 + synthesised": _train_and_evaluate(
            phantom_dir, tmp_path, inputs="synth", synth_ckpt=str(generator_ckpt), run_name="synth"
        ),
    }
    for folder in runs.values():
        scores = json.loads((folder / "scores.json").read_text())
        assert scores["n_cases"] == 2 and scores["n_slices"] > 0
        for key in ("slice_wt_dice", "dice_wt", "dice_tc", "dice_et"):
            assert 0 <= scores[key]["mean"] <= 1 and math.isfinite(scores[key]["std"]), key
        assert len(list(csv.DictReader(open(folder / "per_case.csv")))) == 2
    record = load_checkpoint(str(runs["T2 + synthesised"] / "model.pt"))  # weights_only load
    assert record["inputs"] == "synth" and record["synth_ckpt"] == str(generator_ckpt) and record["in_channels"] == 4
    assert record["features"] == TINY["features"] and record["regions"] == list(REGIONS)
    md = write_table2({name: str(folder / "scores.json") for name, folder in runs.items()}, str(tmp_path))
    assert md.count("\n") == 4 and "T2 + synthesised" in md

    # a segmenter trained on synthesised inputs is not evaluated on other inputs
    with pytest.raises(Exception) as err:
        run_workflow(
            "evaluate_downstream.json", workflow_type=None, dataset_dir=str(phantom_dir), output_dir=str(tmp_path),
            run_name="synth", inputs="real", min_brain_pixels=TINY["min_brain_pixels"], cache_num_workers=0,
        )
    assert "trained on inputs 'synth'" in "".join(str(e) for e in error_chain(err.value))


def test_sanity_check_asks_real_modalities_to_beat_t2_by_more_than_the_seed_spread():
    from scripts.runtime.downstream import sanity_check

    def row(mean, std, seeds, finite=None):  # as merge_over_seeds writes it
        return {"dice_wt": {"mean": mean, "std": std, "n": seeds if finite is None else finite, "n_seeds": seeds}}

    ok, sentence = sanity_check(row(0.60, 0.02, 3), row(0.70, 0.03, 3))
    assert ok and "passed" in sentence and "+0.100" in sentence and "seed spread 0.036" in sentence
    ok, sentence = sanity_check(row(0.60, 0.05, 3), row(0.64, 0.05, 3))
    assert not ok and "not interpretable" in sentence
    ok, sentence = sanity_check({"dice_wt": {"mean": 0.6, "std": 0.1}}, {"dice_wt": {"mean": 0.9, "std": 0.1}})
    assert not ok and "one training seed" in sentence  # no seed spread: never passes
    ok, _ = sanity_check(row(0.6, float("nan"), 3, finite=1), row(0.9, 0.01, 3))
    assert not ok  # only one seed of T2 only gave a finite Dice: no spread to compare with

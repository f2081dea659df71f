"""Specification of the any-missing task (issue #16): ``train.json --variant anymissing``, inference with whatever
modalities a case has (``inference.json --flair/--t1/--t1ce/--t2``), and its evaluation (``evaluate.json``, the scenarios).

Tiny untrained networks (width 4) on small volumes: these tests check the wiring (masks, zero-filling, names,
geometry, errors), not the quality, which ``bundle/docs/anymissing.md`` reports with its commands.
"""

import itertools
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SMALL_MIN_PIXELS, TINY, brain, files_in, root_cause, run_workflow, save_nifti, train_workflow

from scripts.runtime.anymissing import SUBSETS, AvailabilityDraw
from scripts.runtime.cases import datalist_cases, output_names, scenario_mask, synthesis_case
from scripts.runtime.checkpoints import load_model, read_model
from scripts.runtime.conventions import CHANNELS
from scripts.runtime.data import SliceDataset, synthesis_batch
from scripts.runtime.evaluation import SCENARIOS
from scripts.runtime.inference import inference_batch
from scripts.runtime.networks import MISSING_FILL, AnyMissingNet, any_missing_input, make_critic

AFFINE = np.array([[-1.2, 0, 0, 10], [0, -1.1, 0, 200], [0, 0, 2.0, -5], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def any_missing_ckpt(tmp_path_factory):
    """A tiny untrained any-missing generator with 3 slices of context, saved as training writes model.pt."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("anymissing") / "model.pt"
    torch.save(AnyMissingNet(features=4, context=3, upsample="resize").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def case_files(tmp_path_factory):
    """Four modality files of one case on an oblique grid, BraTS-2021 names (``<case>_<modality>.nii.gz``)."""
    root = tmp_path_factory.mktemp("case")
    shape = (40, 36, 24)
    t2 = brain(shape, seed=1)
    files = {}
    for i, m in enumerate(CHANNELS):
        volume = t2 if m == "t2" else np.where(t2 > 0, 1000 - t2 + 40 * i, 0).astype(np.float32)
        files[m] = str(save_nifti(root / f"Case01_{m}.nii.gz", volume, AFFINE))
    return files


def infer(out, ckpt, **inputs):
    run_workflow("inference.json", "infer", ckpt_path=str(ckpt), output_dir=str(out), **inputs)


# --- the network, its input and the draw ---------------------------------------------------------------------------


def test_missing_slots_and_the_target_slot_do_not_reach_the_network():
    torch.manual_seed(0)
    net = AnyMissingNet(features=4, context=3).eval()
    x = torch.rand(2, 12, 128, 128) * 2 - 1
    available = torch.tensor([[False, True, False, True], [True, True, True, False]])
    labels = torch.tensor([0, 3])
    with torch.no_grad():
        out = net(x, available, labels)
        noisy = x.clone()
        noisy[0, 0:3] = 5.0  # sample 0: FLAIR (its target) and T1ce missing
        noisy[0, 6:9] = -3.0
        noisy[1, 9:12] = 7.0  # sample 1: T2, its target, marked missing
        assert torch.equal(net(noisy, available, labels), out)
        # the target's own slot is masked even when ``available`` claims it
        claimed = available.clone()
        claimed[0, 0] = claimed[1, 3] = True
        assert torch.equal(net(noisy, claimed, labels), out)
        # an available slot does reach it
        moved = x.clone()
        moved[0, 3:6] = -moved[0, 3:6]
        assert not torch.equal(net(moved, available, labels)[0], out[0])


def test_input_fill_and_planes_follow_the_mask():
    x = torch.rand(1, 8, 16, 16)
    built = any_missing_input(x, torch.tensor([[True, False, False, True]]), context=2)
    assert built.shape == (1, 12, 16, 16)
    assert torch.equal(built[0, :2], x[0, :2]) and torch.equal(built[0, 6:8], x[0, 6:8])
    assert (built[0, 2:6] == MISSING_FILL).all()
    assert built[0, 8:].flatten(1).mean(1).tolist() == [1.0, 0.0, 0.0, 1.0]


def test_forward_without_labels_gives_the_asked_modalities_as_per_sample_calls():
    torch.manual_seed(0)
    net = AnyMissingNet(features=4).eval()
    x = torch.rand(3, 4, 128, 128) * 2 - 1
    available = torch.tensor([[False, True, True, True]])
    with torch.no_grad():
        together = net(x, available, outputs=[0, 2])
        for j, k in enumerate([0, 2]):
            alone = net(x, available.expand(3, -1), torch.full((3,), k))
            torch.testing.assert_close(together[:, j : j + 1], alone, atol=1e-6, rtol=0)
        assert net(x).shape == (3, 4, 128, 128)  # one input (the zoo tools' call): T2 alone, every modality


def test_draw_keeps_the_target_out_and_covers_every_subset():
    torch.manual_seed(0)
    draw = AvailabilityDraw()
    k = torch.arange(4).repeat(3000)
    available = draw.subsets(k)
    assert not available[torch.arange(len(k)), k].any()
    assert available.any(dim=1).all()
    for t in range(4):
        drawn = {tuple(row) for row in available[k == t].tolist()}
        valid = {tuple(row) for row in SUBSETS.tolist() if not row[t]}
        assert drawn == valid  # all 7 subsets of the other three, so T2 alone (t != T2) and the 3-of-4 one
        share = available[k == t]
        three = (share.sum(1) == 3).float().mean().item()
        assert abs(three - 0.35) < 0.05
        if t != CHANNELS.index("t2"):
            t2_alone = ((share.sum(1) == 1) & share[:, 3]).float().mean().item()
            assert abs(t2_alone - 0.35) < 0.05


def test_draw_condition_is_the_network_input_of_the_centre_slices():
    torch.manual_seed(0)
    image = torch.rand(4, 4, 32, 32) * 2 - 1
    source = torch.rand(4, 12, 32, 32) * 2 - 1
    label = (torch.rand(4, 1, 32, 32) > 0.9).float()
    (g_source, available), condition, k, y, tumour, seg_rows = AvailabilityDraw()(image, label, source)
    assert g_source is source
    assert torch.equal(condition, any_missing_input(source[:, 1::3], available, 1))
    assert torch.equal(y[:, 0], image[torch.arange(4), k])
    assert torch.equal(seg_rows, k < 3) and torch.equal(tumour, label)
    assert make_critic("anymissing", 4, image_size=32)(condition, y)[1].shape == (4, 4)


def test_slice_dataset_stacks_every_channels_neighbours_edges_clamped():
    volume = torch.arange(4 * 2 * 2 * 5, dtype=torch.float32).reshape(4, 2, 2, 5)
    data = SliceDataset([{"image": volume, "label": torch.zeros(1, 2, 2, 5)}], context=3, source="all")
    first = data[0]["source"]  # slice 0: neighbours 0, 0, 1
    assert first.shape == (12, 2, 2)
    for c in range(4):
        for j, z in enumerate([0, 0, 1]):
            assert torch.equal(first[3 * c + j], volume[c, ..., z])


# --- training -------------------------------------------------------------------------------------------------------


def test_training_writes_a_self_describing_any_missing_model(phantom_dir, segmenter_run, tmp_path):
    out = tmp_path / "runs"
    (out / "segmenter").mkdir(parents=True)
    (out / "segmenter" / "model.pt").write_bytes((segmenter_run / "segmenter" / "model.pt").read_bytes())
    run_workflow(["train.json", "recommended.json"], dataset_dir=str(phantom_dir), output_dir=str(out),
                 variant="anymissing", **TINY)  # the any-missing recipe: the recommended model's, any-missing
    arch = read_model(str(out / "anymissing" / "model.pt"), "any-missing generator")
    settings = ("variant", "features", "num_downs", "image_size", "intensity_scaling", "context", "upsample")
    assert {k: arch[k] for k in settings} == {"variant": "anymissing", "features": 4, "num_downs": 7, "image_size": 128,
                                              "intensity_scaling": "volume", "context": 3, "upsample": "resize"}
    assert arch["inputs"] == arch["outputs"] == list(CHANNELS) and arch["in_channels"] == 3
    assert isinstance(load_model(str(out / "anymissing" / "model.pt")), AnyMissingNet)
    assert json.loads((out / "anymissing" / "validation.json").read_text())  # validated on T2 alone


def test_training_needs_the_pretrained_segmenter(phantom_dir, tmp_path):
    with pytest.raises(SystemExit, match="no pre-trained segmenter, which anymissing needs"):
        train_workflow(phantom_dir, tmp_path, "anymissing")


def test_validation_batch_is_the_papers_scenario_for_every_generator():
    """One ``prepare_batch`` validates both kinds: the T2 alone -> the three targets, asked by name."""
    batch = {"image": torch.rand(2, 4, 8, 8), "source": torch.rand(2, 4, 8, 8)}
    x, real, args, kwargs = synthesis_batch(batch)
    assert kwargs["available"].tolist() == [[False, False, False, True]] * 2 and args == ()
    assert kwargs["outputs"] == ["flair", "t1", "t1ce"] and torch.equal(real, batch["image"][:, :3])
    assert torch.equal(x, batch["source"])
    net = AnyMissingNet(features=4, image_size=8, num_downs=3)
    assert net(x, **kwargs).shape == (2, 3, 8, 8)


# --- inference with whatever a case has -----------------------------------------------------------------------------


SUBSETS_1_TO_3 = [s for n in (1, 2, 3) for s in itertools.combinations(CHANNELS, n)]


@pytest.mark.parametrize("present", SUBSETS_1_TO_3, ids=["+".join(s) for s in SUBSETS_1_TO_3])
def test_every_subset_gives_its_missing_modalities_on_the_input_grid(tmp_path, any_missing_ckpt, case_files, present):
    infer(tmp_path, any_missing_ckpt, **{m: case_files[m] for m in present})
    missing = [m for m in CHANNELS if m not in present]
    assert files_in(tmp_path) == sorted(f"Case01_{m}.nii.gz" for m in missing)
    ref = nib.load(case_files[present[0]])
    brain_voxels = np.zeros(ref.shape, bool)
    for m in present:
        brain_voxels |= np.asarray(nib.load(case_files[m]).dataobj) > 0
    for m in missing:
        out = nib.load(str(tmp_path / f"Case01_{m}.nii.gz"))
        assert out.shape == ref.shape and np.allclose(out.affine, ref.affine)
        values = np.asarray(out.dataobj)
        assert (values[~brain_voxels] == 0).all() and 0 <= values.min() and values.max() <= 1


def test_inference_equals_the_network_on_the_scaled_slots_whatever_fills_the_missing_one(
    tmp_path, any_missing_ckpt, case_files
):
    """The inference path zero-fills a missing modality; the network masks its slot itself: so the written T1 is
    the network's answer with *any* content in the T1ce slot, here the real T1ce."""
    from monai.transforms import Compose, Orientation, Resize

    from scripts.runtime.data import ScaleBrainIntensityd
    from scripts.runtime.inference import BrainSliceInferer

    present = {m: case_files[m] for m in ("flair", "t2")}
    infer(tmp_path, any_missing_ckpt, **present, precision="fp32", backend="torch")
    written = np.asarray(nib.load(str(tmp_path / "Case01_t1.nii.gz")).dataobj)
    net = load_model(str(any_missing_ckpt))
    stack = torch.stack([torch.as_tensor(np.asarray(nib.load(case_files[m]).dataobj)) for m in CHANNELS]).float()
    from monai.data import MetaTensor

    image = MetaTensor(stack, affine=torch.as_tensor(AFFINE))
    geometry = Compose([Orientation("RAS"), Resize((128, 128, -1), mode="area")])
    prep = geometry(image)
    scaled = ScaleBrainIntensityd("image")({"image": prep})["image"]
    available = scenario_mask(("flair", "t2"))[None]
    pred = BrainSliceInferer(precision="fp32")(scaled[None], net, available, outputs=[1])[0]
    restored = geometry.inverse(
        MetaTensor((pred.as_tensor() + 1) / 2, meta=prep.meta, applied_operations=prep.applied_operations))
    mask = (stack[[0, 3]] > 0).any(0)
    expected = (restored[0].clamp(0, 1) * mask).numpy()
    np.testing.assert_allclose(written, expected, atol=2e-5)


def test_brats2023_inputs_get_brasyn_names(tmp_path, any_missing_ckpt, case_files):
    names = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
    files = {}
    for m in ("flair", "t1ce", "t2"):
        files[m] = str(save_nifti(tmp_path / "in" / f"BraTS-GLI-00042-000-{names[m]}.nii.gz",
                                  np.asarray(nib.load(case_files[m]).dataobj), AFFINE))  # fmt: skip
    infer(tmp_path / "out", any_missing_ckpt, **files)
    assert files_in(tmp_path / "out") == ["BraTS-GLI-00042-000-t1n.nii.gz"]
    assert output_names("c", ["t2", "flair"]) == ["c_t2", "c_flair"]


def test_a_case_with_all_four_is_reported_and_not_synthesised(tmp_path, any_missing_ckpt, case_files, capfd):
    infer(tmp_path, any_missing_ckpt, **case_files)
    assert files_in(tmp_path) == []
    assert "Case01: has every modality asked for" in "".join(capfd.readouterr())
    assert synthesis_case(case_files, CHANNELS) is None


def test_a_case_with_no_modality_is_a_clear_error():
    with pytest.raises(ValueError, match="no modality given"):
        synthesis_case({m: None for m in CHANNELS}, CHANNELS, "case X")


def test_per_modality_inputs_need_an_any_missing_model(tmp_path, tcmgan_ckpt, case_files):
    with pytest.raises(Exception) as info:
        infer(tmp_path, tcmgan_ckpt, t1=case_files["t1"], t2=case_files["t2"])
    assert "need an any-missing model" in str(info.value) or "need an any-missing model" in repr(info.value.__cause__)


def test_two_t2_volumes_for_one_case_are_refused(tmp_path, any_missing_ckpt, case_files):
    with pytest.raises(Exception) as info:
        infer(tmp_path, any_missing_ckpt, t1=case_files["t1"], t2=case_files["t2"], input="other_t2.nii.gz")
    assert "two T2 volumes for one case" in str(info.value) + repr(info.value.__cause__)
    assert files_in(tmp_path) == []


def test_targets_choose_among_the_missing_modalities(tmp_path, any_missing_ckpt, case_files):
    """``--targets`` means for the any-missing model what it means for a paper one: which of the modalities it would
    write are written."""
    infer(tmp_path, any_missing_ckpt, t1=case_files["t1"], t2=case_files["t2"], targets="t1ce")
    assert files_in(tmp_path) == ["Case01_t1ce.nii.gz"]


def test_a_datalist_with_a_case_twice_is_refused(tmp_path, case_files):
    entry = {"case": "A", "image": [case_files["flair"], None, None, case_files["t2"]]}
    (tmp_path / "datalist.json").write_text(json.dumps({"channels": list(CHANNELS), "test": [entry, entry]}))
    with pytest.raises(ValueError, match=r"appear more than once in 'test': \['A'\]"):
        datalist_cases(str(tmp_path / "datalist.json"), "test", CHANNELS, CHANNELS)


def test_grids_that_differ_are_one_error_naming_both_files(tmp_path, any_missing_ckpt, case_files):
    other = save_nifti(tmp_path / "Case01_t1.nii.gz", np.asarray(nib.load(case_files["t1"]).dataobj)[:, :, :20],
                       AFFINE)  # fmt: skip
    with pytest.raises(Exception) as info:
        infer(tmp_path / "out", any_missing_ckpt, t1=str(other), t2=case_files["t2"])
    text = str(info.value) + repr(info.value.__cause__)
    assert "not on one voxel grid" in text and "Case01_t1.nii.gz" in text
    assert files_in(tmp_path / "out") == []


def test_datalist_entries_with_null_modalities(tmp_path, any_missing_ckpt, case_files):
    entries = [
        {"case": "A", "image": [case_files["flair"], None, case_files["t1ce"], case_files["t2"]]},
        {"case": "B", "image": [case_files[m] for m in CHANNELS]},
    ]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"channels": list(CHANNELS), "test": entries}))
    cases = datalist_cases(str(datalist), "test", CHANNELS, CHANNELS)
    assert [c["case"] for c in cases] == ["A"] and cases[0]["missing"] == "t1"
    batch = {"image": torch.zeros(1, 4, 2, 2, 2), "available": cases[0]["available"][None], "missing": ["t1"]}
    asked = inference_batch(batch)[3]
    assert asked["outputs"] == ["t1"] and asked["available"].tolist() == [[True, False, True, True]]


# --- evaluation -----------------------------------------------------------------------------------------------------


def test_evaluation_writes_the_scenario_and_downstream_tables(phantom_dir, tmp_path, any_missing_ckpt, tcmgan_ckpt):
    run_workflow("train_downstream.json", dataset_dir=str(phantom_dir), output_dir=str(tmp_path), inputs="real",
                 **TINY)  # fmt: skip
    run_workflow("evaluate.json", dataset_dir=str(phantom_dir), output_dir=str(tmp_path / "ev"),
                 ckpt_path=str(any_missing_ckpt), paper_ckpt=str(tcmgan_ckpt),
                 downstream_ckpt=str(tmp_path / "downstream" / "real" / "model.pt"),
                 min_brain_pixels=SMALL_MIN_PIXELS, max_cases=1)  # fmt: skip
    scores = json.loads((tmp_path / "ev" / "scores.json").read_text())
    assert set(scores["scenarios"]) == set(SCENARIOS)
    for name, methods in scores["scenarios"].items():
        expected = {"anymissing", "baseline", "baseline_choices"} | ({"paper"} if name.startswith("t2_only") else set())
        assert set(methods) == expected
        choices = methods["baseline_choices"]
        assert all(c.removeprefix("inverted ") in SCENARIOS[name][0] for c in choices)
    assert len(scores["downstream"]) == 9
    table = (tmp_path / "ev" / "scenarios.md").read_text()
    assert "t2 -> flair | TC-MGAN (paper, T2 only)" in table and "3 real + t1ce zero-filled" in table
    challenge = scores["scenarios"]["missing_t1"]["anymissing"]  # the challenge's SSIM beside ours
    assert all(0 < challenge[k]["mean"] <= 1 for k in ("brasyn_ssim", "brasyn_ssim_healthy"))
    assert "The BraSyn challenge's 3D SSIM" in table
    from figures import anymissing_figure

    example = np.load(tmp_path / "ev" / "examples.npz")
    assert example["anymissing_missing_t2_axial"].shape == example["real_t2_axial"].shape
    for view in ("axial", "sagittal"):
        png = anymissing_figure(tmp_path / "ev" / "examples.npz", tmp_path / f"{view}.png", view=view)
        assert (tmp_path / f"{view}.png").stat().st_size > 10_000 and png.endswith(f"{view}.png")


def test_the_scenario_options_are_refused_for_a_paper_model(phantom_dir, tmp_path, tcmgan_ckpt):
    """evaluate.json gives a paper generator Table 1; the options of the scenario evaluation are an error for it."""
    with pytest.raises(Exception) as info:
        run_workflow("evaluate.json", dataset_dir=str(phantom_dir), output_dir=str(tmp_path),
                     ckpt_path=str(tcmgan_ckpt), paper_ckpt=str(tcmgan_ckpt), min_brain_pixels=SMALL_MIN_PIXELS)
    assert "reads the T2 alone, and its evaluation is Table 1" in str(root_cause(info.value))
    assert not (tmp_path / "scores.json").exists()


def test_brasyn_folder_with_a_missing_modality_runs_through_prepare_datalist(tmp_path, any_missing_ckpt):
    """A BraSyn validation-style folder (three modalities, no label): ``prepare_datalist --allow_missing true`` lists
    it with nulls, and inference writes each case's one missing modality under BraSyn's name."""
    from conftest import SMALL_SHAPE

    from scripts.phantom import generate
    from scripts.prepare_datalist import prepare_datalist

    generate(str(tmp_path / "d"), num_cases=2, seed=0, layout="brats2023", shape=SMALL_SHAPE)
    cases = sorted(p.name for p in (tmp_path / "d").iterdir() if p.is_dir())
    for case, tag in zip(cases, ("t1n", "t2w")):
        (tmp_path / "d" / case / f"{case}-{tag}.nii.gz").unlink()
        (tmp_path / "d" / case / f"{case}-seg.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="required file"):
        prepare_datalist(str(tmp_path / "d"), fractions="[0,0,1]")
    with pytest.raises(ValueError, match="can only be inference inputs"):  # not into the training splits
        prepare_datalist(str(tmp_path / "d"), allow_missing="true")
    prepare_datalist(str(tmp_path / "d"), fractions="[0,0,1]", allow_missing="true")
    infer(tmp_path / "out", any_missing_ckpt, dataset_dir=str(tmp_path / "d"), check_contrast="false")
    assert files_in(tmp_path / "out") == [f"{cases[0]}-t1n.nii.gz", f"{cases[1]}-t2w.nii.gz"]


def test_validate_scores_an_any_missing_model_through_the_paper_models_config(phantom_dir, tmp_path, any_missing_ckpt):
    """validate.json reads what model.pt is (checkpoints.read_model): an any-missing generator is validated on
    the paper's task (T2 alone -> each target) without any option naming its kind."""
    wf = run_workflow(["train.json", "validate.json"], dataset_dir=str(phantom_dir), output_dir=str(tmp_path),
                      ckpt_path=str(any_missing_ckpt), min_brain_pixels=SMALL_MIN_PIXELS, val_num_cases=1,
                      cache_num_workers=0)  # fmt: skip
    assert wf.parser.get_parsed_content("variant") == "anymissing"
    metrics = wf.parser.get_parsed_content("validate#evaluator").state.metrics
    assert {"val_psnr", "val_ssim"} <= metrics.keys() and all(np.isfinite(metrics[k]) for k in ("val_psnr", "val_ssim"))

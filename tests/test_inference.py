"""Specification of volume inference: bundle/configs/inference.json and bundle/scripts/runtime/inference.py.

The workflow: every test writes tiny T2 volumes (a textured ellipsoid "brain" in a zero background) and uses a
generator checkpoint of features 4 made by the tests (``tcmgan_ckpt``), so no shipped model.pt is needed. Most
runs go through ``ConfigWorkflow`` in this process (what ``monai.bundle run`` does); the command line itself is
run in three tests.

The inferer (``BrainSliceInferer`` and its ``SliceRunner``): it equals MONAI's ``SliceInferer`` while running only
the brain slices, and its ONNX Runtime and ``torch.compile`` engines give torch's outputs or fall back to it. How
fast each is is measured by ``tools/benchmark.py`` (``bundle/docs/performance.md``), never asserted here.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE, CONFIGS, REPO, brain, files_in, root_cause, run_workflow, save_nifti, truncated
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor
from monai.inferers import SliceInferer
from torch import nn

from scripts.runtime import files, inference
from scripts.runtime.cases import inference_cases
from scripts.runtime.inference import BrainSliceInferer
from scripts.runtime.networks import TARGETS, SynthesisNet

CONFIG = CONFIGS / "inference.json"
META = CONFIGS / "metadata.json"
CHANNELS = ["flair", "t1", "t1ce", "t2"]
# BraTS stores 240x240x155 volumes with this affine (axis codes L, P, S).
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])


def synthesise(output_dir: Path, ckpt, **override) -> None:
    """Run inference.json in this process, as ``monai.bundle run`` does."""
    workflow = ConfigWorkflow(
        config_file=str(CONFIG),
        meta_file=str(META),
        workflow_type="infer",
        bundle_root=str(BUNDLE),
        output_dir=str(output_dir),
        ckpt_path=str(ckpt),
        **override,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def outputs(output_dir: Path, case: str) -> dict:
    """``{target: nibabel image}`` of one case."""
    return {t: nib.load(str(output_dir / f"{case}_{t}.nii.gz")) for t in TARGETS}


def write_datalist(root: Path, splits: dict) -> Path:
    """BraTS-2021-like case folders (4 files per case, only the T2 matters) and their datalist.json.

    ``splits``: ``{split: {case id: T2 array}}``.
    """
    content = {"name": "test", "layout": "brats2021", "channels": CHANNELS, "gan": [], "seg": [], "test": []}
    for split, cases in splits.items():
        for case, t2 in cases.items():
            files = []
            for channel in CHANNELS:
                volume = t2 if channel == "t2" else np.flip(t2, 0).copy()
                save_nifti(root / case / f"{case}_{channel}.nii.gz", volume)
                files.append(f"{case}/{case}_{channel}.nii.gz")
            content[split].append({"case": case, "image": files, "label": f"{case}/{case}_seg.nii.gz"})
    path = root / "datalist.json"
    path.write_text(json.dumps(content))
    return path


# --- outputs: names, geometry, intensities ---------------------------------------------------------------------


def test_case_id_drops_extension_and_t2_tag():
    assert files.case_id("/d/BraTS2021_00000_t2.nii.gz") == "BraTS2021_00000"
    assert files.case_id("/d/BraTS-GLI-00000-000-t2w.nii.gz") == "BraTS-GLI-00000-000"
    assert files.case_id("/d/sub-01_T2w.nrrd") == "sub-01"
    assert files.case_id("/d/t2.mha") == "t2"
    assert files.case_id("/d/series7/") == "series7"


def test_brats_volume_gives_three_targets_on_its_grid_in_0_1(tmp_path, tcmgan_ckpt):
    t2 = brain((240, 240, 155))
    src = save_nifti(tmp_path / "BraTS2021_00000_t2.nii.gz", t2, BRATS_AFFINE)
    synthesise(tmp_path / "out", tcmgan_ckpt, input=str(src))

    assert files_in(tmp_path / "out") == sorted(f"BraTS2021_00000_{t}.nii.gz" for t in TARGETS)
    for target, img in outputs(tmp_path / "out", "BraTS2021_00000").items():
        data = np.asarray(img.dataobj)
        assert img.shape == t2.shape
        np.testing.assert_array_equal(img.affine, BRATS_AFFINE)
        np.testing.assert_allclose(img.get_qform(), BRATS_AFFINE, atol=1e-5)  # what ITK-based viewers read
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        assert data.dtype == np.float32
        assert img.header["descrip"].item().decode() == f"brainsynth synthetic {target}, intensity [0,1]"
        assert data.min() >= 0.0 and data.max() <= 1.0
        assert np.all(data[t2 == 0] == 0)  # background, and every slice without brain, is 0
        assert np.all(data[..., :2] == 0) and np.all(data[..., -2:] == 0)
        assert np.mean(data[t2 > 0] > 0) > 0.99  # the brain is synthesised


@pytest.mark.parametrize(
    "storage, index_map, axcodes",
    [
        # stored index b -> RAS index a = M @ b
        ("lps", np.array([[-1, 0, 0, 63], [0, -1, 0, 47], [0, 0, 1, 0], [0, 0, 0, 1]]), ("L", "P", "S")),
        ("permuted", np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]]), ("S", "R", "A")),
    ],
)
def test_storage_orientation_does_not_change_the_synthesis(tmp_path, tcmgan_ckpt, storage, index_map, axcodes):
    """The same anatomy stored RAS or in another orientation gives the same synthetic image in world space,
    each written on its own grid."""
    ras_affine = np.diag([1.1, 0.9, 2.0, 1.0])
    ras = brain((64, 48, 20))
    stored = np.flip(ras, (0, 1)).copy() if storage == "lps" else ras.transpose(2, 0, 1).copy()
    stored_affine = ras_affine @ index_map
    synthesise(tmp_path / "ras", tcmgan_ckpt, input=str(save_nifti(tmp_path / "ras.nii.gz", ras, ras_affine)))
    src = save_nifti(tmp_path / "other.nii.gz", stored, stored_affine)
    synthesise(tmp_path / "other", tcmgan_ckpt, input=str(src))

    for target, img in outputs(tmp_path / "other", "other").items():
        ras_out = np.asarray(outputs(tmp_path / "ras", "ras")[target].dataobj)
        expected = np.flip(ras_out, (0, 1)) if storage == "lps" else ras_out.transpose(2, 0, 1)
        assert img.shape == stored.shape
        np.testing.assert_array_equal(img.affine, nib.load(str(src)).affine)  # stored_affine, in float32
        assert nib.aff2axcodes(img.affine) == axcodes
        np.testing.assert_allclose(np.asarray(img.dataobj), expected, atol=1e-6)


def test_odd_oblique_grid_keeps_shape_and_affine(tmp_path, tcmgan_ckpt):
    """256x256x120 at 0.9x0.9x1.2 mm, rotated 10 degrees about z, with an origin."""
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    affine = np.array([[c, -s, 0, -115.0], [s, c, 0, -120.0], [0, 0, 1, -70.0], [0, 0, 0, 1]])
    affine[:3, :3] = affine[:3, :3] @ np.diag([0.9, 0.9, 1.2])
    t2 = brain((256, 256, 120))
    src = save_nifti(tmp_path / "odd.nii.gz", t2, affine)
    synthesise(tmp_path / "out", tcmgan_ckpt, input=str(src))

    for img in outputs(tmp_path / "out", "odd").values():
        assert img.shape == (256, 256, 120)
        np.testing.assert_array_equal(img.affine, nib.load(str(src)).affine)
        np.testing.assert_allclose(img.header.get_zooms(), (0.9, 0.9, 1.2), rtol=1e-6)
        assert np.all(np.asarray(img.dataobj)[t2 == 0] == 0)


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
def test_itk_formats_are_read_and_written_as_nifti_on_the_same_grid(tmp_path, tcmgan_ckpt, ext):
    t2 = brain((48, 40, 16))  # index order x, y, z
    image = itk.image_from_array(np.ascontiguousarray(t2.transpose(2, 1, 0)))  # ITK arrays are z, y, x
    direction = np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]])  # a non-trivial LPS direction
    image.SetSpacing((0.9, 1.1, 2.0))
    image.SetOrigin((10.0, -20.0, 5.0))
    image.SetDirection(itk.matrix_from_array(direction))
    src = tmp_path / f"sub-01_T2w{ext}"
    itk.imwrite(image, str(src))
    synthesise(tmp_path / "out", tcmgan_ckpt, input=str(src))

    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag([0.9, 1.1, 2.0])
    lps[:3, 3] = (10.0, -20.0, 5.0)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # the same grid in NIfTI's RAS world
    assert files_in(tmp_path / "out") == sorted(f"sub-01_{t}.nii.gz" for t in TARGETS)
    for img in outputs(tmp_path / "out", "sub-01").values():
        assert img.shape == t2.shape
        np.testing.assert_allclose(img.affine, ras, atol=1e-5)
        assert np.all(np.asarray(img.dataobj)[t2 == 0] == 0)  # voxel order kept (the cut octant stays put)


# --- many cases --------------------------------------------------------------------------------------------------


def test_datalist_run_equals_single_runs_and_reads_only_the_test_split(tmp_path, tcmgan_ckpt):
    data = tmp_path / "data"
    test_cases = {"c1": brain((64, 64, 20), 1), "c2": brain((56, 72, 16), 2)}  # two grids in one run
    datalist = write_datalist(data, {"gan": {"g0": brain((32, 32, 8), 9)}, "test": test_cases})
    synthesise(tmp_path / "batch", tcmgan_ckpt, datalist=str(datalist))
    assert files_in(tmp_path / "batch") == sorted(f"{c}_{t}.nii.gz" for c in ("c1", "c2") for t in TARGETS)

    for case in ("c1", "c2"):
        synthesise(tmp_path / case, tcmgan_ckpt, input=str(data / case / f"{case}_t2.nii.gz"))
        for target, img in outputs(tmp_path / "batch", case).items():
            alone = outputs(tmp_path / case, case)[target]
            np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(alone.dataobj))
            np.testing.assert_array_equal(img.affine, alone.affine)


def test_datalist_split_id_selects_the_split(tmp_path, tcmgan_ckpt):
    splits = {"gan": {"g0": brain((32, 32, 8))}, "test": {"c1": brain((32, 32, 8))}}
    datalist = write_datalist(tmp_path / "data", splits)
    synthesise(tmp_path / "out", tcmgan_ckpt, datalist=str(datalist), datalist_split="gan")
    assert files_in(tmp_path / "out") == sorted(f"g0_{t}.nii.gz" for t in TARGETS)


def test_msd_4d_entry_uses_its_t2_channel(tmp_path, tcmgan_ckpt):
    t2 = brain((48, 48, 12))
    others = [np.flip(t2, 0), np.flip(t2, 1), 2 * t2]
    save_nifti(tmp_path / "data" / "imagesTr" / "BRATS_001.nii.gz", np.stack([*others, t2], axis=-1))
    entry = {"case": "BRATS_001", "image": "imagesTr/BRATS_001.nii.gz", "label": "labelsTr/BRATS_001.nii.gz"}
    datalist = tmp_path / "data" / "datalist.json"
    datalist.write_text(json.dumps({"channels": CHANNELS, "gan": [], "seg": [], "test": [entry]}))
    synthesise(tmp_path / "msd", tcmgan_ckpt, datalist=str(datalist))
    synthesise(tmp_path / "t2", tcmgan_ckpt, input=str(save_nifti(tmp_path / "BRATS_001_t2.nii.gz", t2)))

    alone = outputs(tmp_path / "t2", "BRATS_001")
    for target, img in outputs(tmp_path / "msd", "BRATS_001").items():
        assert img.shape == t2.shape
        np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(alone[target].dataobj))


# --- the network comes from the checkpoint ----------------------------------------------------------------------


def test_variant_and_width_are_read_from_the_checkpoint(tmp_path):
    saved = SynthesisNet("pix2pix", features=8).state_dict()
    torch.save(saved, tmp_path / "model.pt")
    workflow = ConfigWorkflow(
        config_file=str(CONFIG), workflow_type="infer", bundle_root=str(BUNDLE), ckpt_path=str(tmp_path / "model.pt")
    )
    workflow.initialize()
    network = workflow.parser.get_parsed_content("network")
    assert network.variant == "pix2pix" and int(network.arch[1]) == 8
    assert all(torch.equal(v.cpu(), saved[k]) for k, v in network.state_dict().items())


@pytest.mark.parametrize(
    "override, says",
    [({"features": 16}, "features 4 (the workflow asks 16)"),
     ({"variant": "mgan"}, "variant 'tcmgan' (the workflow asks 'mgan')")],
    ids=["features", "variant"],
)  # fmt: skip
def test_inference_override_that_contradicts_the_checkpoint_says_which(tcmgan_ckpt, override, says):
    workflow = ConfigWorkflow(config_file=str(CONFIG), workflow_type="infer", bundle_root=str(BUNDLE),
                              ckpt_path=str(tcmgan_ckpt), device="cpu", **override)  # fmt: skip
    workflow.initialize()
    with pytest.raises(Exception) as info:
        workflow.parser.get_parsed_content("network")
    error = root_cause(info.value)
    assert isinstance(error, ValueError) and str(tcmgan_ckpt) in str(error) and says in str(error), str(error)


# --- bad input: one error naming the file, nothing written --------------------------------------------------------


def _truncated_gzip(path: Path) -> None:
    truncated(save_nifti(path, brain((64, 64, 20))))


def _with(value):
    def write(path: Path) -> None:
        t2 = brain((32, 32, 8))
        t2[10, 10, 4] = value
        save_nifti(path, t2)

    return write


BAD_INPUTS = {
    "missing": (lambda p: None, FileNotFoundError, "no such file"),
    "not_an_image": (lambda p: p.write_text("not an image"), ValueError, "cannot be read as an image"),
    "truncated_gzip": (_truncated_gzip, ValueError, "cannot be read as an image"),
    "4d": (lambda p: save_nifti(p, np.stack([brain((32, 32, 8))] * 4, -1)), ValueError, r"shape \(32, 32, 8, 4\)"),
    "2d": (lambda p: save_nifti(p, brain((32, 32, 8))[..., 4]), ValueError, r"shape \(32, 32\); a 3D volume"),
    "nan": (_with(np.nan), ValueError, "1 voxels are NaN or Inf"),
    "inf": (_with(np.inf), ValueError, "1 voxels are NaN or Inf"),
    "constant": (lambda p: save_nifti(p, np.full((32, 32, 8), 7.0, np.float32)), ValueError, "constant image"),
    "z_scored": (
        lambda p: save_nifti(p, (brain((32, 32, 8)) - 300.0) / 100.0),
        ValueError,
        "non-zero voxels are negative",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_raises_one_error_naming_the_file_and_writes_nothing(tmp_path, tcmgan_ckpt, kind):
    write, error_type, message = BAD_INPUTS[kind]
    src = tmp_path / f"{kind}.nii.gz"
    write(src)
    with pytest.raises(Exception) as info:
        synthesise(tmp_path / "out", tcmgan_ckpt, input=str(src))
    error = root_cause(info.value)
    assert type(error) is error_type
    assert str(error).startswith(str(src))
    assert re.search(message, str(error))
    assert files_in(tmp_path / "out") == []


@pytest.mark.parametrize(
    "entry, error_type, message",
    [
        ({"case": "c9", "label": "c9/c9_seg.nii.gz"}, ValueError, "case c9 in 'test' has no T2 image"),
        ({"case": "c9", "image": []}, ValueError, "case c9 in 'test' has no T2 image"),
        ({"case": "c9", "image": ["c9/a.nii.gz", "c9/b.nii.gz"]}, ValueError, "lists 2 image files"),
        ({"case": "c9", "image": [f"c9/c9_{c}.nii.gz" for c in CHANNELS]}, FileNotFoundError, "c9_t2.nii.gz: no such"),
    ],
)
def test_bad_datalist_entry_fails_before_any_case_is_written(tmp_path, tcmgan_ckpt, entry, error_type, message):
    datalist = write_datalist(tmp_path / "data", {"test": {"c1": brain((32, 32, 8))}})
    content = json.loads(datalist.read_text())
    content["test"].append(entry)
    datalist.write_text(json.dumps(content))
    with pytest.raises(Exception) as info:
        synthesise(tmp_path / "out", tcmgan_ckpt, datalist=str(datalist))
    error = root_cause(info.value)
    assert type(error) is error_type and message in str(error)
    assert files_in(tmp_path / "out") == []


def test_corrupt_case_in_a_datalist_leaves_earlier_cases_whole_and_nothing_of_its_own(tmp_path, tcmgan_ckpt):
    datalist = write_datalist(tmp_path / "data", {"test": {"c1": brain((32, 32, 8)), "c2": brain((64, 64, 20))}})
    _truncated_gzip(tmp_path / "data" / "c2" / "c2_t2.nii.gz")
    with pytest.raises(Exception) as info:
        synthesise(tmp_path / "out", tcmgan_ckpt, datalist=str(datalist))
    assert str(root_cause(info.value)).startswith(str(tmp_path / "data" / "c2" / "c2_t2.nii.gz"))
    assert files_in(tmp_path / "out") == sorted(f"c1_{t}.nii.gz" for t in TARGETS)  # no c2 file, no temp file
    assert all(img.shape == (32, 32, 8) for img in outputs(tmp_path / "out", "c1").values())


def test_a_failed_write_leaves_no_file_of_the_case(tmp_path, monkeypatch):
    real_save, calls = nib.save, []

    def save_then_fail(img, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(img, path)

    monkeypatch.setattr(inference.nib, "save", save_then_fail)
    data = {"pred": torch.rand(3, 8, 8, 4), "mask": MetaTensor(torch.ones(1, 8, 8, 4)), "case": "c1"}
    with pytest.raises(OSError, match="disk full"):
        inference.SaveTargetsd(output_dir=str(tmp_path / "out"))(data)
    assert files_in(tmp_path / "out") == []


def test_uncompressed_output_holds_the_same_volumes(tmp_path, tcmgan_ckpt):
    """``--output_ext .nii`` writes the same float32 volumes, header and affine as the default ``.nii.gz``."""
    src = save_nifti(tmp_path / "c1_t2.nii.gz", brain((32, 32, 8)), BRATS_AFFINE)
    synthesise(tmp_path / "gz", tcmgan_ckpt, input=str(src))
    synthesise(tmp_path / "raw", tcmgan_ckpt, input=str(src), output_ext=".nii")
    assert files_in(tmp_path / "raw") == sorted(f"c1_{t}.nii" for t in TARGETS)
    for target, img in outputs(tmp_path / "gz", "c1").items():
        raw = nib.load(str(tmp_path / "raw" / f"c1_{target}.nii"))
        np.testing.assert_array_equal(np.asarray(raw.dataobj), np.asarray(img.dataobj))
        np.testing.assert_array_equal(raw.affine, img.affine)
        assert raw.header["descrip"] == img.header["descrip"]
    with pytest.raises(ValueError, match="output_ext must be '.nii.gz' or '.nii', got '.mha'"):
        inference.SaveTargetsd(output_ext=".mha")


@pytest.mark.parametrize("targets, written", [("t1ce", ["t1ce"]), ("flair,T1", ["flair", "t1"]),
                                               (["t1", "t1ce"], ["t1", "t1ce"])])  # fmt: skip
def test_targets_writes_only_the_chosen_ones_with_the_same_volumes(tmp_path, tcmgan_ckpt, targets, written):
    src = save_nifti(tmp_path / "c1_t2.nii.gz", brain((32, 32, 8)), BRATS_AFFINE)
    synthesise(tmp_path / "all", tcmgan_ckpt, input=str(src))
    synthesise(tmp_path / "some", tcmgan_ckpt, input=str(src), targets=targets)
    assert files_in(tmp_path / "some") == sorted(f"c1_{t}.nii.gz" for t in written)
    for t in written:
        np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "some" / f"c1_{t}.nii.gz")).dataobj),
                                      np.asarray(nib.load(str(tmp_path / "all" / f"c1_{t}.nii.gz")).dataobj))
    # a rerun with the same targets counts the case as done; asking for another target synthesises it
    assert inference_cases(input=str(src), output_dir=str(tmp_path / "some"), overwrite=False,
                                     targets=targets) == []  # fmt: skip
    assert len(inference_cases(input=str(src), output_dir=str(tmp_path / "some"), overwrite=False)) == 1


def test_an_unknown_target_is_one_error_before_any_work(tmp_path, tcmgan_ckpt):
    src = save_nifti(tmp_path / "c1_t2.nii.gz", brain((32, 32, 8)))
    result = run_cli("--input", str(src), "--output_dir", str(tmp_path / "out"), "--ckpt_path", str(tcmgan_ckpt),
                     "--targets", "t2,flair")  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "ValueError: --targets t2,flair: unknown target(s) ['t2']; choose from flair, t1, t1ce")
    assert files_in(tmp_path / "out") == []


# --- the command line ---------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run <args> --bundle_root bundle --config_file bundle/configs/inference.json``."""
    command = [sys.executable, "-m", "monai.bundle", "run", *args]
    command += ["--bundle_root", "bundle", "--config_file", "bundle/configs/inference.json"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_single_input(tmp_path, tcmgan_ckpt):
    src = save_nifti(tmp_path / "case7_t2.nii.gz", brain((32, 32, 8)))
    out = tmp_path / "out"
    result = run_cli("--input", str(src), "--output_dir", str(out), "--ckpt_path", str(tcmgan_ckpt))
    assert result.returncode == 0, result.stdout + result.stderr
    assert files_in(out) == sorted(f"case7_{t}.nii.gz" for t in TARGETS)
    assert re.search(r"\[1/1\] case7: \d+\.\d s", result.stdout + result.stderr)  # one progress line per case


def test_cli_inference_run_id_reads_the_datalist_of_dataset_dir(tmp_path, tcmgan_ckpt):
    write_datalist(tmp_path / "data", {"test": {"c1": brain((32, 32, 8))}})
    out = tmp_path / "out"
    data = str(tmp_path / "data")
    result = run_cli("inference", "--dataset_dir", data, "--output_dir", str(out), "--ckpt_path", str(tcmgan_ckpt))
    assert result.returncode == 0, result.stdout + result.stderr
    assert files_in(out) == sorted(f"c1_{t}.nii.gz" for t in TARGETS)


def test_a_rerun_keeps_the_cases_already_written_unless_overwrite(tmp_path, tcmgan_ckpt, capfd):
    """A killed batch resumes by running again: a case whose three outputs exist is kept (one line) and the others
    are synthesised; ``--overwrite true`` synthesises every case again."""
    write_datalist(tmp_path / "data", {"test": {"c1": brain((32, 32, 8)), "c2": brain((32, 32, 8), seed=1)}})
    out, data = tmp_path / "out", str(tmp_path / "data")
    synthesise(out, tcmgan_ckpt, dataset_dir=data)
    first = {f: (out / f).stat().st_mtime_ns for f in files_in(out)}
    for target in TARGETS:  # as if the run had been killed before c2's outputs were renamed into place
        (out / f"c2_{target}.nii.gz").unlink()
    capfd.readouterr()
    synthesise(out, tcmgan_ckpt, dataset_dir=data)
    log = "".join(capfd.readouterr())
    assert f"c1: kept the outputs of an earlier run in {out} (--overwrite true synthesises it again)" in log
    assert "c2: kept" not in log and "1 of 2 cases already done; synthesising 1" in log
    now = {f: (out / f).stat().st_mtime_ns for f in files_in(out)}
    assert now.keys() == first.keys() and all(now[f] == first[f] for f in now if f.startswith("c1_"))
    synthesise(out, tcmgan_ckpt, dataset_dir=data)  # nothing left to do: no work, no error
    assert "2 of 2 cases already done; synthesising 0" in "".join(capfd.readouterr())
    synthesise(out, tcmgan_ckpt, dataset_dir=data, overwrite=True)
    assert all((out / f).stat().st_mtime_ns > now[f] for f in now)


def test_cli_bad_input_ends_in_the_error_naming_the_file(tmp_path, tcmgan_ckpt):
    src = tmp_path / "broken_t2.nii.gz"
    _truncated_gzip(src)
    result = run_cli("--input", str(src), "--output_dir", str(tmp_path / "out"), "--ckpt_path", str(tcmgan_ckpt))
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line[:1].isalpha() and "Error: " in line]
    # MONAI's own closing wrapper ("RuntimeError: Failed to evaluate ...") follows the one error that matters
    ours = [e for e in errors if not e.startswith("RuntimeError: Failed to evaluate")]
    assert len(ours) == 1 and ours[0].startswith(f"ValueError: {src}: cannot be read as an image (EOFError: ")
    assert files_in(tmp_path / "out") == []


# === the inferer of runtime/inference.py: BrainSliceInferer, its SliceRunner and engines ===========================


# --- BrainSliceInferer runs only the brain slices ----------------------------------------------------------------


class CountingNet(nn.Module):
    """Wraps a network and counts the slices it is given."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.slices, self.calls = net, 0, []

    def forward(self, x):
        self.slices += x.shape[0]
        self.calls.append(x.shape[0])
        return self.net(x)


def volume_with_empty_slices(depth=12, empty=(0, 1, 7, 11), seed=0) -> torch.Tensor:
    """``(1, 1, 128, 128, depth)`` in [-1, 1]; the slices in ``empty`` are all background (-1)."""
    g = torch.Generator().manual_seed(seed)
    vol = torch.rand(1, 1, 128, 128, depth, generator=g) * 2 - 1
    vol[..., list(empty)] = -1.0
    return vol


def test_brain_slice_inferer_equals_slice_inferer_and_runs_only_brain_slices():
    torch.manual_seed(0)
    net = SynthesisNet("tcmgan", features=4).eval()
    vol = volume_with_empty_slices()
    with torch.no_grad():
        expected = SliceInferer(roi_size=(128, 128), spatial_dim=2, sw_batch_size=5)(vol, net)
        counting = CountingNet(net)
        got = BrainSliceInferer(sw_batch_size=5)(MetaTensor(vol), counting)
    assert got.shape == (1, 3, 128, 128, 12) and isinstance(got, MetaTensor)
    torch.testing.assert_close(got.as_tensor(), torch.as_tensor(expected), atol=1e-5, rtol=0)
    assert counting.slices == 8 + 1  # 8 brain slices and one all-background slice for the 4 empty ones
    assert counting.calls == [5, 4]  # 9 slices in ceil(9 / 5) = 2 batches as equal as can be


def test_brain_slice_inferer_on_a_volume_without_brain_runs_one_slice():
    torch.manual_seed(0)
    net = CountingNet(SynthesisNet("mgan", features=4).eval())
    vol = -torch.ones(1, 1, 128, 128, 6)
    with torch.no_grad():
        got = BrainSliceInferer(sw_batch_size=64)(vol, net)
        one = net.net(-torch.ones(1, 1, 128, 128))
    assert net.slices == 1  # one all-background slice stands for all six
    torch.testing.assert_close(got, one[..., None].expand(-1, -1, -1, -1, 6), atol=1e-6, rtol=0)


def test_brain_slice_inferer_under_autocast_returns_the_input_dtype():
    """``inference.json --amp true`` runs the inferer under autocast: the network answers in half precision and the
    volume keeps float32 (on a GPU float16; bfloat16 on the CPU here, the same code path)."""
    torch.manual_seed(0)
    net = SynthesisNet("tcmgan", features=4).eval()
    vol = volume_with_empty_slices(depth=6, empty=(0, 5))
    with torch.no_grad():
        full = BrainSliceInferer(sw_batch_size=4)(vol, net)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert net(vol[..., 1]).dtype == torch.bfloat16
            got = BrainSliceInferer(sw_batch_size=4)(vol, net)
    assert got.dtype == torch.float32 and got.shape == full.shape
    torch.testing.assert_close(got, full, atol=0.1, rtol=0)  # bfloat16 keeps ~3 significant digits


# --- the ONNX Runtime engine (backend "onnxruntime", the CPU's "auto") --------------------------------------------


@pytest.mark.parametrize("variant", ["tcmgan", "pix2pix"])
def test_onnxruntime_backend_equals_torch_for_any_number_of_slices(variant):
    """One export (dynamic batch size) serves volumes with other numbers of brain slices, with torch's outputs."""
    torch.manual_seed(0)
    net = SynthesisNet(variant, features=4).eval()
    inferer = BrainSliceInferer(sw_batch_size=4, backend="onnxruntime")
    for depth, empty in ((10, (0, 9)), (7, ())):  # batches of 3, 3, 3 then 4, 3
        vol = volume_with_empty_slices(depth=depth, empty=empty)
        with torch.no_grad():
            expected = BrainSliceInferer(sw_batch_size=4)(vol, net)
        got = inferer(vol, net)
        assert inferer.runner.last_engine == "onnxruntime" and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert inferer.runner.exports == 1  # one export for both depths


def test_onnxruntime_backend_follows_new_weights():
    """The exported model is rebuilt when the network changes: another network or weights loaded in place."""
    torch.manual_seed(0)
    net, other = SynthesisNet("mgan", features=4).eval(), SynthesisNet("mgan", features=4).eval()
    vol = volume_with_empty_slices(depth=4, empty=())
    inferer = BrainSliceInferer(backend="onnxruntime")
    inferer(vol, net)
    session = inferer.runner.session
    inferer(vol, net)
    assert inferer.runner.session is session  # same weights: no new export
    net.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(inferer(vol, net), BrainSliceInferer()(vol, other), atol=1e-5, rtol=0)
    assert inferer.runner.session is not session


def test_auto_backend_uses_onnxruntime_on_the_cpu_only_when_installed(monkeypatch):
    net = SynthesisNet("mgan", features=4).eval()
    vol = volume_with_empty_slices(depth=3, empty=())
    auto = BrainSliceInferer(backend="auto")
    auto(vol, net)
    assert auto.runner.last_engine == "onnxruntime"
    monkeypatch.setattr(inference, "onnxruntime_available", lambda: False)
    missing = BrainSliceInferer(backend="auto")
    missing(vol, net)
    assert missing.runner.last_engine == "eager" and missing.runner.session is None
    with pytest.raises(ImportError, match="backend 'onnxruntime' needs the onnx and onnxruntime packages"):
        BrainSliceInferer(backend="onnxruntime")(vol, net)
    with pytest.raises(ValueError, match="backend must be one of"):
        BrainSliceInferer(backend="onnx")
    assert inference.resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match="backend 'onnxruntime' runs on the CPU, but the slices are on cuda"):
        inference.resolve_backend("onnxruntime", "cuda")


# --- the torch.compile engine (compile=True) ----------------------------------------------------------------------


class PerSampleNet(nn.Module):
    """A small per-sample (N, 1, H, W) -> (N, 3, H, W) network: compiles in seconds."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.InstanceNorm2d(3)

    def forward(self, x):
        return torch.tanh(self.norm(self.conv(x)))


def test_compiled_inferer_gives_the_same_output_for_any_number_of_brain_slices():
    torch.manual_seed(0)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    net = PerSampleNet().eval()
    inferer = BrainSliceInferer(sw_batch_size=4, compile=True)
    for depth, empty in ((10, (0, 9)), (7, ())):  # batches of 3, 3, 3 then 4, 3: one compiled graph for all
        vol = volume_with_empty_slices(depth=depth, empty=empty)
        with torch.no_grad():
            eager = BrainSliceInferer(sw_batch_size=4)(vol, net)
            got = inferer(vol, net)
        torch.testing.assert_close(got, eager, atol=1e-5, rtol=0)
    assert inferer.runner.last_engine == "compiled"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # no recompilation for other batch sizes


def test_inference_compiles_only_for_many_volumes(phantom_dir):
    wf = run_workflow("inference.json", workflow_type="inference", run=False, dataset_dir=str(phantom_dir))
    assert wf.parser.get_parsed_content("compile") is False  # 2 test cases: eager
    assert wf.parser.get_parsed_content("inferer").compile is False


# --- a failing fast engine falls back to eager torch, with one warning --------------------------------------------


def _broken_onnx_export(*args, **kwargs):
    raise RuntimeError("unsupported operator")


def _broken_compile(network, **kwargs):
    def run(*args, **kw):
        raise RuntimeError("no C++ compiler found")

    return run


FALLBACKS = {
    # engine: (what breaks, the inferer, its network, the volume, the warning, the inferer after the fall back)
    "onnxruntime": (
        (torch.onnx, "export", _broken_onnx_export),
        dict(backend="auto"),
        lambda: SynthesisNet("mgan", features=4).eval(),
        dict(depth=3, empty=()),
        "ONNX Runtime path failed (RuntimeError: unsupported operator); running with torch",
        lambda inferer: inferer.backend == "torch" and inferer.runner.session is None,
    ),
    "compile": (
        (torch, "compile", _broken_compile),
        dict(sw_batch_size=4, compile=True),
        PerSampleNet,
        dict(depth=6, empty=(0,)),
        "torch.compile failed (RuntimeError: no C++ compiler found); running eagerly",
        lambda inferer: inferer.compile is False,
    ),
}


@pytest.mark.parametrize("engine", list(FALLBACKS))
def test_inferer_falls_back_to_eager_torch_when_its_engine_fails(monkeypatch, caplog, engine):
    """A failing ONNX export or ``torch.compile`` is logged once and the volume is run with eager torch, with
    torch's output; the inferer then stays on eager torch."""
    (module, name, broken), settings, make_net, volume, warning, fell_back = FALLBACKS[engine]
    monkeypatch.setattr(module, name, broken)
    net = make_net()
    vol = volume_with_empty_slices(**volume)
    inferer = BrainSliceInferer(**settings)
    with caplog.at_level("WARNING"):
        got = inferer(vol, net)
    with torch.no_grad():
        eager = BrainSliceInferer(**{k: v for k, v in settings.items() if k not in ("backend", "compile")})
        torch.testing.assert_close(got, eager(vol, net))
    assert warning in caplog.text
    assert fell_back(inferer)

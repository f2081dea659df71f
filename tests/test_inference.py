"""Specification of volume inference: bundle/configs/inference.json and bundle/scripts/runtime/inference.py.

Every test writes tiny T2 volumes (a textured ellipsoid "brain" in a zero background) and a generator checkpoint
of features 4 made here, so no shipped model.pt is needed. Most runs go through ``ConfigWorkflow`` in this
process (what ``monai.bundle run`` does); the command line itself is run in three tests.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIG = BUNDLE / "configs" / "inference.json"
META = BUNDLE / "configs" / "metadata.json"
if str(BUNDLE) not in sys.path:
    sys.path.insert(0, str(BUNDLE))

from scripts.runtime import inference  # noqa: E402
from scripts.runtime.networks import TARGETS, SynthesisNet  # noqa: E402

CHANNELS = ["flair", "t1", "t1ce", "t2"]
# BraTS stores 240x240x155 volumes with this affine (axis codes L, P, S).
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A generator checkpoint (plain state_dict, as training writes model.pt) of a tiny TC-MGAN."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(SynthesisNet("tcmgan", features=4).state_dict(), path)
    return str(path)


def brain(shape, seed: int = 0) -> np.ndarray:
    """T2-like float32 volume: a textured ellipsoid of positive values in a zero background, with one octant
    cut away (so that any flip or axis swap shows) and no brain on the first and last two axial slices."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = (x / 0.85) ** 2 + (y / 0.8) ** 2 + (z / 0.9) ** 2 < 1
    inside &= ~((x > 0.3) & (y > 0.3))
    vol = np.where(inside, 300 + 200 * x + 100 * y**2 + 50 * rng.random(shape), 0).astype(np.float32)
    vol[..., :2] = 0
    vol[..., -2:] = 0
    return vol


def save_nifti(path: Path, array: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def synthesise(output_dir: Path, ckpt: str, **override) -> None:
    """Run inference.json in this process, as ``monai.bundle run`` does."""
    workflow = ConfigWorkflow(
        config_file=str(CONFIG),
        meta_file=str(META),
        workflow_type="infer",
        bundle_root=str(BUNDLE),
        output_dir=str(output_dir),
        ckpt_path=ckpt,
        **override,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def outputs(output_dir: Path, case: str) -> dict:
    """``{target: nibabel image}`` of one case."""
    return {t: nib.load(str(output_dir / f"{case}_{t}.nii.gz")) for t in TARGETS}


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception under MONAI's config and transform wrappers."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def files_in(folder: Path) -> list:
    """Every entry of ``folder``, hidden temporary files included ([] when the folder does not exist)."""
    return sorted(os.listdir(folder)) if folder.exists() else []


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
    assert inference.case_id("/d/BraTS2021_00000_t2.nii.gz") == "BraTS2021_00000"
    assert inference.case_id("/d/BraTS-GLI-00000-000-t2w.nii.gz") == "BraTS-GLI-00000-000"
    assert inference.case_id("/d/sub-01_T2w.nrrd") == "sub-01"
    assert inference.case_id("/d/t2.mha") == "t2"
    assert inference.case_id("/d/series7/") == "series7"


def test_brats_volume_gives_three_targets_on_its_grid_in_0_1(tmp_path, ckpt):
    t2 = brain((240, 240, 155))
    src = save_nifti(tmp_path / "BraTS2021_00000_t2.nii.gz", t2, BRATS_AFFINE)
    synthesise(tmp_path / "out", ckpt, input=str(src))

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
def test_storage_orientation_does_not_change_the_synthesis(tmp_path, ckpt, storage, index_map, axcodes):
    """The same anatomy stored RAS or in another orientation gives the same synthetic image in world space,
    each written on its own grid."""
    ras_affine = np.diag([1.1, 0.9, 2.0, 1.0])
    ras = brain((64, 48, 20))
    stored = np.flip(ras, (0, 1)).copy() if storage == "lps" else ras.transpose(2, 0, 1).copy()
    stored_affine = ras_affine @ index_map
    synthesise(tmp_path / "ras", ckpt, input=str(save_nifti(tmp_path / "ras.nii.gz", ras, ras_affine)))
    src = save_nifti(tmp_path / "other.nii.gz", stored, stored_affine)
    synthesise(tmp_path / "other", ckpt, input=str(src))

    for target, img in outputs(tmp_path / "other", "other").items():
        ras_out = np.asarray(outputs(tmp_path / "ras", "ras")[target].dataobj)
        expected = np.flip(ras_out, (0, 1)) if storage == "lps" else ras_out.transpose(2, 0, 1)
        assert img.shape == stored.shape
        np.testing.assert_array_equal(img.affine, nib.load(str(src)).affine)  # stored_affine, in float32
        assert nib.aff2axcodes(img.affine) == axcodes
        np.testing.assert_allclose(np.asarray(img.dataobj), expected, atol=1e-6)


def test_odd_oblique_grid_keeps_shape_and_affine(tmp_path, ckpt):
    """256x256x120 at 0.9x0.9x1.2 mm, rotated 10 degrees about z, with an origin."""
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    affine = np.array([[c, -s, 0, -115.0], [s, c, 0, -120.0], [0, 0, 1, -70.0], [0, 0, 0, 1]])
    affine[:3, :3] = affine[:3, :3] @ np.diag([0.9, 0.9, 1.2])
    t2 = brain((256, 256, 120))
    src = save_nifti(tmp_path / "odd.nii.gz", t2, affine)
    synthesise(tmp_path / "out", ckpt, input=str(src))

    for img in outputs(tmp_path / "out", "odd").values():
        assert img.shape == (256, 256, 120)
        np.testing.assert_array_equal(img.affine, nib.load(str(src)).affine)
        np.testing.assert_allclose(img.header.get_zooms(), (0.9, 0.9, 1.2), rtol=1e-6)
        assert np.all(np.asarray(img.dataobj)[t2 == 0] == 0)


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
def test_itk_formats_are_read_and_written_as_nifti_on_the_same_grid(tmp_path, ckpt, ext):
    t2 = brain((48, 40, 16))  # index order x, y, z
    image = itk.image_from_array(np.ascontiguousarray(t2.transpose(2, 1, 0)))  # ITK arrays are z, y, x
    direction = np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]])  # a non-trivial LPS direction
    image.SetSpacing((0.9, 1.1, 2.0))
    image.SetOrigin((10.0, -20.0, 5.0))
    image.SetDirection(itk.matrix_from_array(direction))
    src = tmp_path / f"sub-01_T2w{ext}"
    itk.imwrite(image, str(src))
    synthesise(tmp_path / "out", ckpt, input=str(src))

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


def test_datalist_run_equals_single_runs_and_reads_only_the_test_split(tmp_path, ckpt):
    data = tmp_path / "data"
    test_cases = {"c1": brain((64, 64, 20), 1), "c2": brain((56, 72, 16), 2)}  # two grids in one run
    datalist = write_datalist(data, {"gan": {"g0": brain((32, 32, 8), 9)}, "test": test_cases})
    synthesise(tmp_path / "batch", ckpt, datalist=str(datalist))
    assert files_in(tmp_path / "batch") == sorted(f"{c}_{t}.nii.gz" for c in ("c1", "c2") for t in TARGETS)

    for case in ("c1", "c2"):
        synthesise(tmp_path / case, ckpt, input=str(data / case / f"{case}_t2.nii.gz"))
        for target, img in outputs(tmp_path / "batch", case).items():
            alone = outputs(tmp_path / case, case)[target]
            np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(alone.dataobj))
            np.testing.assert_array_equal(img.affine, alone.affine)


def test_datalist_split_id_selects_the_split(tmp_path, ckpt):
    splits = {"gan": {"g0": brain((32, 32, 8))}, "test": {"c1": brain((32, 32, 8))}}
    datalist = write_datalist(tmp_path / "data", splits)
    synthesise(tmp_path / "out", ckpt, datalist=str(datalist), datalist_split="gan")
    assert files_in(tmp_path / "out") == sorted(f"g0_{t}.nii.gz" for t in TARGETS)


def test_msd_4d_entry_uses_its_t2_channel(tmp_path, ckpt):
    t2 = brain((48, 48, 12))
    others = [np.flip(t2, 0), np.flip(t2, 1), 2 * t2]
    save_nifti(tmp_path / "data" / "imagesTr" / "BRATS_001.nii.gz", np.stack([*others, t2], axis=-1))
    entry = {"case": "BRATS_001", "image": "imagesTr/BRATS_001.nii.gz", "label": "labelsTr/BRATS_001.nii.gz"}
    datalist = tmp_path / "data" / "datalist.json"
    datalist.write_text(json.dumps({"channels": CHANNELS, "gan": [], "seg": [], "test": [entry]}))
    synthesise(tmp_path / "msd", ckpt, datalist=str(datalist))
    synthesise(tmp_path / "t2", ckpt, input=str(save_nifti(tmp_path / "BRATS_001_t2.nii.gz", t2)))

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


def test_width_override_that_contradicts_the_checkpoint_fails_clearly(tmp_path, ckpt):
    workflow = ConfigWorkflow(
        config_file=str(CONFIG), workflow_type="infer", bundle_root=str(BUNDLE), ckpt_path=ckpt, features=16
    )
    workflow.initialize()
    with pytest.raises(Exception) as info:
        workflow.parser.get_parsed_content("network")
    error = root_cause(info.value)
    assert isinstance(error, ValueError) and ckpt in str(error) and "features 4" in str(error)


# --- bad input: one error naming the file, nothing written --------------------------------------------------------


def _truncated_gzip(path: Path) -> None:
    save_nifti(path, brain((64, 64, 20)))
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


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
    "2d": (lambda p: save_nifti(p, brain((32, 32, 8))[..., 4]), ValueError, r"shape \(32, 32\); a 3D T2"),
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
def test_bad_input_raises_one_error_naming_the_file_and_writes_nothing(tmp_path, ckpt, kind):
    write, error_type, message = BAD_INPUTS[kind]
    src = tmp_path / f"{kind}.nii.gz"
    write(src)
    with pytest.raises(Exception) as info:
        synthesise(tmp_path / "out", ckpt, input=str(src))
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
def test_bad_datalist_entry_fails_before_any_case_is_written(tmp_path, ckpt, entry, error_type, message):
    datalist = write_datalist(tmp_path / "data", {"test": {"c1": brain((32, 32, 8))}})
    content = json.loads(datalist.read_text())
    content["test"].append(entry)
    datalist.write_text(json.dumps(content))
    with pytest.raises(Exception) as info:
        synthesise(tmp_path / "out", ckpt, datalist=str(datalist))
    error = root_cause(info.value)
    assert type(error) is error_type and message in str(error)
    assert files_in(tmp_path / "out") == []


def test_corrupt_case_in_a_datalist_leaves_earlier_cases_whole_and_nothing_of_its_own(tmp_path, ckpt):
    datalist = write_datalist(tmp_path / "data", {"test": {"c1": brain((32, 32, 8)), "c2": brain((64, 64, 20))}})
    _truncated_gzip(tmp_path / "data" / "c2" / "c2_t2.nii.gz")
    with pytest.raises(Exception) as info:
        synthesise(tmp_path / "out", ckpt, datalist=str(datalist))
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


def test_uncompressed_output_holds_the_same_volumes(tmp_path, ckpt):
    """``--output_ext .nii`` writes the same float32 volumes, header and affine as the default ``.nii.gz``."""
    src = save_nifti(tmp_path / "c1_t2.nii.gz", brain((32, 32, 8)), BRATS_AFFINE)
    synthesise(tmp_path / "gz", ckpt, input=str(src))
    synthesise(tmp_path / "raw", ckpt, input=str(src), output_ext=".nii")
    assert files_in(tmp_path / "raw") == sorted(f"c1_{t}.nii" for t in TARGETS)
    for target, img in outputs(tmp_path / "gz", "c1").items():
        raw = nib.load(str(tmp_path / "raw" / f"c1_{target}.nii"))
        np.testing.assert_array_equal(np.asarray(raw.dataobj), np.asarray(img.dataobj))
        np.testing.assert_array_equal(raw.affine, img.affine)
        assert raw.header["descrip"] == img.header["descrip"]
    with pytest.raises(ValueError, match="output_ext must be '.nii.gz' or '.nii', got '.mha'"):
        inference.SaveTargetsd(output_ext=".mha")


# --- the command line ---------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run <args> --bundle_root bundle --config_file bundle/configs/inference.json``."""
    command = [sys.executable, "-m", "monai.bundle", "run", *args]
    command += ["--bundle_root", "bundle", "--config_file", "bundle/configs/inference.json"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_single_input(tmp_path, ckpt):
    src = save_nifti(tmp_path / "case7_t2.nii.gz", brain((32, 32, 8)))
    out = tmp_path / "out"
    result = run_cli("--input", str(src), "--output_dir", str(out), "--ckpt_path", ckpt)
    assert result.returncode == 0, result.stdout + result.stderr
    assert files_in(out) == sorted(f"case7_{t}.nii.gz" for t in TARGETS)


def test_cli_inference_run_id_reads_the_datalist_of_dataset_dir(tmp_path, ckpt):
    write_datalist(tmp_path / "data", {"test": {"c1": brain((32, 32, 8))}})
    out = tmp_path / "out"
    data = str(tmp_path / "data")
    result = run_cli("inference", "--dataset_dir", data, "--output_dir", str(out), "--ckpt_path", ckpt)
    assert result.returncode == 0, result.stdout + result.stderr
    assert files_in(out) == sorted(f"c1_{t}.nii.gz" for t in TARGETS)


def test_cli_bad_input_ends_in_the_error_naming_the_file(tmp_path, ckpt):
    src = tmp_path / "broken_t2.nii.gz"
    _truncated_gzip(src)
    result = run_cli("--input", str(src), "--output_dir", str(tmp_path / "out"), "--ckpt_path", ckpt)
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line[:1].isalpha() and "Error: " in line]
    # MONAI's own closing wrapper ("RuntimeError: Failed to evaluate ...") follows the one error that matters
    ours = [e for e in errors if not e.startswith("RuntimeError: Failed to evaluate")]
    assert len(ours) == 1 and ours[0].startswith(f"ValueError: {src}: cannot be read as an image (EOFError: ")
    assert files_in(tmp_path / "out") == []

"""Specification of the datalist builder, bundle/scripts/prepare_datalist.py.

Every test builds a tiny fake data set (8x8x4 volumes) in one of the four layouts under tmp_path.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLE
from monai.data import load_decathlon_datalist

from scripts import prepare_datalist as pdl

SCRIPT = BUNDLE / "scripts" / "prepare_datalist.py"

# File endings of the four channels (in FLAIR, T1, T1ce, T2 order) and the label, per BraTS layout.
BRATS_ENDINGS = {
    "brats2018": ["_flair", "_t1", "_t1ce", "_t2", "_seg"],
    "brats2021": ["_flair", "_t1", "_t1ce", "_t2", "_seg"],
    "brats2023": ["-t2f", "-t1n", "-t1c", "-t2w", "-seg"],
}


def _volume(path: Path, shape=(8, 8, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).random(shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def _case_id(layout: str, i: int) -> str:
    return {
        "brats2018": f"Brats18_TEST_{i}_1",
        "brats2021": f"BraTS2021_{i:05d}",
        "brats2023": f"BraTS-GLI-{i:05d}-000",
        "msd": f"BRATS_{i:03d}",
    }[layout]


def make_dataset(root: Path, layout: str, n: int = 4, ext: str = ".nii.gz") -> list[str]:
    """Write n fake cases of ``layout`` under ``root``; return their ids."""
    ids = [_case_id(layout, i) for i in range(n)]
    for i, case in enumerate(ids):
        if layout == "msd":
            _volume(root / "imagesTr" / f"{case}{ext}", shape=(8, 8, 4, 4))
            _volume(root / "labelsTr" / f"{case}{ext}")
            continue
        folder = root / case
        if layout == "brats2018":
            folder = root / ("HGG" if i % 2 == 0 else "LGG") / case
        for ending in BRATS_ENDINGS[layout]:
            _volume(folder / f"{case}{ending}{ext}")
    return ids


def _all_items(datalist: dict) -> list[dict]:
    return datalist["gan"] + datalist["seg"] + datalist["test"]


def _build(root: Path, **kwargs) -> dict:
    path = pdl.prepare_datalist(str(root), **kwargs)
    with open(path) as f:
        return json.load(f)


# --- layouts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["brats2018", "brats2021", "brats2023", "msd"])
def test_layout_is_detected_and_every_case_listed(tmp_path, layout):
    ids = make_dataset(tmp_path, layout, n=5)
    found_layout, cases = pdl.find_cases(str(tmp_path))
    assert pdl.detect_layout(str(tmp_path)) == layout
    assert found_layout == layout
    assert [c["case"] for c in cases] == sorted(ids)


def test_brats2018_keeps_hgg_and_lgg_subfolders_in_paths(tmp_path):
    make_dataset(tmp_path, "brats2018", n=2)
    _, cases = pdl.find_cases(str(tmp_path))
    by_id = {c["case"]: c for c in cases}
    assert by_id["Brats18_TEST_0_1"]["label"] == "HGG/Brats18_TEST_0_1/Brats18_TEST_0_1_seg.nii.gz"
    assert by_id["Brats18_TEST_1_1"]["label"] == "LGG/Brats18_TEST_1_1/Brats18_TEST_1_1_seg.nii.gz"


def test_brats2018_with_only_lgg_is_recognised(tmp_path):
    make_dataset(tmp_path, "brats2018", n=2)
    os.rename(tmp_path / "HGG" / "Brats18_TEST_0_1", tmp_path / "LGG" / "Brats18_TEST_0_1")
    (tmp_path / "HGG").rmdir()
    layout, cases = pdl.find_cases(str(tmp_path))
    assert layout == "brats2018"
    assert len(cases) == 2


def test_uncompressed_nii_files_are_accepted(tmp_path):
    make_dataset(tmp_path, "brats2018", n=2, ext=".nii")
    _, cases = pdl.find_cases(str(tmp_path))
    assert cases[0]["image"][0] == "HGG/Brats18_TEST_0_1/Brats18_TEST_0_1_flair.nii"


@pytest.mark.parametrize(
    "layout, stem, endings",
    [
        ("brats2021", "BraTS2021_00000/BraTS2021_00000", ["_flair", "_t1", "_t1ce", "_t2", "_seg"]),
        ("brats2023", "BraTS-GLI-00000-000/BraTS-GLI-00000-000", ["-t2f", "-t1n", "-t1c", "-t2w", "-seg"]),
    ],
    ids=["brats2021_flair_t1_t1ce_t2", "brats2023_t2f_t1n_t1c_t2w"],
)
def test_image_lists_flair_t1_t1ce_t2_under_the_layouts_names(tmp_path, layout, stem, endings):
    """BraTS 2021 names the files flair, t1, t1ce, t2; BraTS 2023 t2f, t1n, t1c, t2w (the same four, in that
    order)."""
    make_dataset(tmp_path, layout, n=1)
    _, cases = pdl.find_cases(str(tmp_path))
    assert cases[0]["image"] == [f"{stem}{e}.nii.gz" for e in endings[:4]]
    assert cases[0]["label"] == f"{stem}{endings[4]}.nii.gz"


def test_msd_image_is_one_4d_file_and_hidden_files_are_ignored(tmp_path):
    make_dataset(tmp_path, "msd", n=2)
    (tmp_path / "imagesTr" / "._BRATS_000.nii.gz").write_bytes(b"macos resource fork")
    (tmp_path / "imagesTr" / ".hidden.nii.gz").write_bytes(b"")
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}}))
    _, cases = pdl.find_cases(str(tmp_path))
    assert cases == [
        {"case": "BRATS_000", "image": "imagesTr/BRATS_000.nii.gz", "label": "labelsTr/BRATS_000.nii.gz"},
        {"case": "BRATS_001", "image": "imagesTr/BRATS_001.nii.gz", "label": "labelsTr/BRATS_001.nii.gz"},
    ]


@pytest.mark.parametrize(
    "layout, labels",
    [
        ("brats2018", {"necrosis": 1, "edema": 2, "enhancing": 4}),
        ("brats2021", {"necrosis": 1, "edema": 2, "enhancing": 4}),
        ("brats2023", {"necrosis": 1, "edema": 2, "enhancing": 3}),
        ("msd", {"necrosis": 2, "edema": 1, "enhancing": 3}),
    ],
)
def test_json_header_names_layout_channels_and_source_labels(tmp_path, layout, labels):
    make_dataset(tmp_path, layout, n=3)
    datalist = _build(tmp_path, seed=3)
    assert list(datalist) == ["name", "layout", "channels", "labels", "seed", "fractions", "gan", "seg", "test"]
    assert datalist["layout"] == layout
    assert datalist["channels"] == ["flair", "t1", "t1ce", "t2"]
    assert datalist["labels"] == labels
    assert datalist["seed"] == 3
    assert datalist["fractions"] == [0.35, 0.35, 0.30]


@pytest.mark.parametrize("layout", ["brats2018", "brats2021", "msd"])
def test_load_decathlon_datalist_resolves_existing_absolute_paths(tmp_path, layout):
    make_dataset(tmp_path, layout, n=3)
    path = pdl.prepare_datalist(str(tmp_path))
    for key in ("gan", "seg", "test"):
        items = load_decathlon_datalist(path, data_list_key=key, base_dir=str(tmp_path))
        assert len(items) == 1
        images = items[0]["image"] if isinstance(items[0]["image"], list) else [items[0]["image"]]
        assert len(images) == (1 if layout == "msd" else 4)
        for file in images + [items[0]["label"]]:
            assert os.path.isabs(file) and os.path.isfile(file)


# --- split ---------------------------------------------------------------------------------------


def test_splits_are_disjoint_and_cover_every_case(tmp_path):
    ids = make_dataset(tmp_path, "brats2021", n=20)
    datalist = _build(tmp_path)
    split_ids = {key: {item["case"] for item in datalist[key]} for key in ("gan", "seg", "test")}
    assert [len(split_ids[k]) for k in ("gan", "seg", "test")] == [7, 7, 6]
    assert not split_ids["gan"] & split_ids["seg"]
    assert not split_ids["gan"] & split_ids["test"]
    assert not split_ids["seg"] & split_ids["test"]
    assert split_ids["gan"] | split_ids["seg"] | split_ids["test"] == set(ids)


def test_same_seed_writes_byte_identical_json(tmp_path):
    make_dataset(tmp_path, "brats2021", n=20)
    first = Path(pdl.prepare_datalist(str(tmp_path), output=str(tmp_path / "a.json"), seed=7)).read_bytes()
    second = Path(pdl.prepare_datalist(str(tmp_path), output=str(tmp_path / "b.json"), seed=7)).read_bytes()
    assert first == second


def test_other_seed_gives_other_split(tmp_path):
    make_dataset(tmp_path, "brats2021", n=20)
    a = _build(tmp_path, output=str(tmp_path / "a.json"), seed=0)
    b = _build(tmp_path, output=str(tmp_path / "b.json"), seed=1)
    assert [i["case"] for i in a["test"]] != [i["case"] for i in b["test"]]


def test_split_ignores_input_order():
    cases = [{"case": f"c{i:03d}"} for i in range(30)]
    forward = pdl.split_cases(cases, seed=5)
    backward = pdl.split_cases(list(reversed(cases)), seed=5)
    assert forward == backward


def test_paper_fractions_give_100_100_85_of_285():
    cases = [{"case": f"Brats18_{i:03d}"} for i in range(285)]
    splits = pdl.split_cases(cases, fractions=(0.35, 0.35, 0.30), seed=0)
    assert [len(splits[k]) for k in ("gan", "seg", "test")] == [100, 100, 85]


def test_left_over_cases_go_to_largest_fractional_parts():
    # 10 * (0.35, 0.35, 0.30) = (3.5, 3.5, 3.0): floors 3+3+3, the one left over goes to gan (tie, earlier)
    assert pdl.split_counts(10, (0.35, 0.35, 0.30)) == (4, 3, 3)
    # 7 * (0.5, 0.3, 0.2) = (3.5, 2.1, 1.4): floors 3+2+1, the one left over goes to gan (.5 largest)
    assert pdl.split_counts(7, (0.5, 0.3, 0.2)) == (4, 2, 1)
    # 5 * (0.1, 0.1, 0.8) = (0.5, 0.5, 4.0): floors 0+0+4, the one left over goes to gan; seg takes one from test
    assert pdl.split_counts(5, (0.1, 0.1, 0.8)) == (1, 1, 3)


def test_every_nonzero_split_gets_a_case_from_three_cases():
    assert pdl.split_counts(3, (0.98, 0.01, 0.01)) == (1, 1, 1)
    assert pdl.split_counts(3, (1.0, 0.0, 0.0)) == (3, 0, 0)


def test_fractions_given_as_text_are_parsed(tmp_path):
    make_dataset(tmp_path, "brats2021", n=10)
    datalist = _build(tmp_path, fractions="[0.5, 0.3, 0.2]")
    assert datalist["fractions"] == [0.5, 0.3, 0.2]
    assert [len(datalist[k]) for k in ("gan", "seg", "test")] == [5, 3, 2]


# --- command line and import ---------------------------------------------------------------------


def test_cli_writes_default_output_and_summary(tmp_path):
    make_dataset(tmp_path, "brats2023", n=10)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--data_dir", str(tmp_path), "--seed", "2", "--fractions", "[0.5,0.3,0.2]"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    written = tmp_path / "datalist.json"
    datalist = json.loads(written.read_text())
    assert datalist["seed"] == 2
    assert [len(datalist[k]) for k in ("gan", "seg", "test")] == [5, 3, 2]
    assert "brats2023" in result.stdout and "gan 5, seg 3, test 2" in result.stdout
    assert str(written) in result.stdout
    # the CLI writes exactly what the Python API writes for the same arguments
    api = pdl.prepare_datalist(str(tmp_path), output=str(tmp_path / "api.json"), seed=2, fractions=[0.5, 0.3, 0.2])
    assert Path(api).read_bytes() == written.read_bytes()


# --- errors --------------------------------------------------------------------------------------


def _no_json_written(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".json") or p.name.endswith(".tmp")]


def test_missing_modality_names_case_and_file_and_writes_nothing(tmp_path):
    make_dataset(tmp_path, "brats2021", n=3)
    missing = tmp_path / "BraTS2021_00001" / "BraTS2021_00001_t1ce.nii.gz"
    missing.unlink()
    with pytest.raises(FileNotFoundError) as err:
        pdl.prepare_datalist(str(tmp_path))
    assert "BraTS2021_00001" in str(err.value)
    assert str(missing) in str(err.value)
    assert _no_json_written(tmp_path)


@pytest.mark.parametrize(
    "layout, case, label",
    [
        ("brats2023", "BraTS-GLI-00000-000", "BraTS-GLI-00000-000/BraTS-GLI-00000-000-seg.nii.gz"),
        ("msd", "BRATS_001", "labelsTr/BRATS_001.nii.gz"),
    ],
    ids=["brats2023_seg", "msd_label"],
)
def test_missing_label_names_case_and_file(tmp_path, layout, case, label):
    make_dataset(tmp_path, layout, n=2)
    missing = tmp_path / label
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=case) as err:
        pdl.find_cases(str(tmp_path))
    assert str(missing) in str(err.value)


def test_msd_image_without_4_channels_is_rejected(tmp_path):
    make_dataset(tmp_path, "msd", n=1)
    _volume(tmp_path / "imagesTr" / "BRATS_000.nii.gz", shape=(8, 8, 4))
    with pytest.raises(ValueError, match="4 channels"):
        pdl.find_cases(str(tmp_path))


def test_same_case_in_hgg_and_lgg_is_rejected(tmp_path):
    make_dataset(tmp_path, "brats2018", n=1)
    case = "Brats18_TEST_0_1"
    for ending in BRATS_ENDINGS["brats2018"]:
        _volume(tmp_path / "LGG" / case / f"{case}{ending}.nii.gz")
    with pytest.raises(ValueError, match=case):
        pdl.find_cases(str(tmp_path))


def test_unrecognised_folder_names_folder_and_expected_layouts(tmp_path):
    (tmp_path / "scans").mkdir()
    _volume(tmp_path / "scans" / "brain.nii.gz")
    with pytest.raises(ValueError) as err:
        pdl.prepare_datalist(str(tmp_path))
    message = str(err.value)
    assert str(tmp_path) in message
    for layout in ("brats2018", "brats2021", "brats2023", "msd"):
        assert layout in message
    assert _no_json_written(tmp_path)


def test_missing_data_dir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        pdl.detect_layout(str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    "fractions",
    [(0.4, 0.4, 0.4), (0.5, 0.5), (1.2, -0.1, -0.1), (0.5, 0.5, float("nan")), "not a list"],
)
def test_bad_fractions_are_rejected_and_nothing_written(tmp_path, fractions):
    make_dataset(tmp_path, "brats2021", n=3)
    with pytest.raises(ValueError, match="fraction"):
        pdl.prepare_datalist(str(tmp_path), fractions=fractions)
    assert _no_json_written(tmp_path)


def test_error_leaves_an_existing_datalist_untouched(tmp_path):
    make_dataset(tmp_path, "brats2021", n=3)
    path = Path(pdl.prepare_datalist(str(tmp_path)))
    before = path.read_bytes()
    (tmp_path / "BraTS2021_00002" / "BraTS2021_00002_flair.nii.gz").unlink()
    with pytest.raises(FileNotFoundError):
        pdl.prepare_datalist(str(tmp_path), seed=9)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["datalist.json"]

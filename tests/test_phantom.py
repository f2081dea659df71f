"""Specification of the BraTS-like phantom generator (bundle/scripts/phantom.py) and its figure
(``phantom_figure`` of tools/figures.py)."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import BUNDLE

from scripts import phantom
from figures import phantom_figure

SMALL = (64, 64, 48)  # tiny grid for file-layout tests; the brain is scaled to fit
MEDIUM = (96, 96, 64)


def _load(path):
    img = nib.load(str(path))
    return img, np.asarray(img.dataobj)


@pytest.fixture(scope="module")
def full_case():
    """One full-size 240x240x155 high-grade-like case (ring-enhancing tumour) of the fixed domain, whose contrast
    table the tests below specify (the randomised domains are specified further down)."""
    seed = next(s for s in range(50) if phantom.make_case(s, SMALL, "fixed")["kind"] == "hgg")
    return phantom.make_case(seed, domain="fixed")


# ---------------------------------------------------------------------------------------------- geometry
def test_full_case_arrays_have_brats_shape_and_dtypes(full_case):
    for mod in phantom.MODALITIES:
        assert full_case[mod].shape == (240, 240, 155)
        assert full_case[mod].dtype == np.float32
    assert full_case["label"].dtype == np.uint8
    assert set(np.unique(full_case["label"])) == {0, 1, 2, 3}


def test_background_is_exactly_zero_and_brain_positive(full_case):
    brain = full_case["brain"]
    assert 1.0e6 < brain.sum() < 2.0e6  # an adult brain is 1-2 litres
    for mod in phantom.MODALITIES:
        assert np.all(full_case[mod][~brain] == 0), mod
        assert np.all(full_case[mod][brain] >= 1), mod
    assert np.all(full_case["label"][~brain] == 0)


def test_brain_fits_inside_the_grid_with_top_below_last_slice(full_case):
    idx = np.argwhere(full_case["brain"])
    lo, hi = idx.min(0), idx.max(0)
    assert np.all(lo[:2] > 10) and np.all(hi[:2] < 230)
    assert hi[2] < 154  # the vertex is not cut off


def test_brats2021_layout_files_affine_and_labels(tmp_path):
    ids = phantom.generate(tmp_path, num_cases=2, seed=0, layout="brats2021", shape=SMALL)
    assert ids == ["BraTS2021_00000", "BraTS2021_00001"]
    expected_affine = np.array([[-1, 0, 0, 0], [0, -1, 0, SMALL[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    for i, cid in enumerate(ids):
        names = sorted(p.name for p in (tmp_path / cid).iterdir())
        assert names == sorted(f"{cid}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg"))
        case = phantom.make_case(phantom.case_seed(0, i), SMALL)
        for m in phantom.MODALITIES:
            img, data = _load(tmp_path / cid / f"{cid}_{m}.nii.gz")
            assert data.shape == SMALL and data.dtype == np.int16
            np.testing.assert_array_equal(img.affine, expected_affine)
            assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
            np.testing.assert_array_equal(data, np.rint(case[m]).astype(np.int16))
        img, seg = _load(tmp_path / cid / f"{cid}_seg.nii.gz")
        assert seg.dtype == np.uint8
        np.testing.assert_array_equal(seg, np.array([0, 1, 2, 4], np.uint8)[case["label"]])
    _, seg1 = _load(tmp_path / ids[1] / f"{ids[1]}_seg.nii.gz")
    assert set(np.unique(seg1)) == {0, 1, 2, 4}  # case 1 is high-grade-like: enhancing written as 4


def test_brats2018_layout_splits_hgg_and_lgg(tmp_path):
    ids = phantom.generate(tmp_path, num_cases=2, seed=0, layout="brats2018", shape=SMALL, domain="fixed")
    # with seed 0 (fixed domain), case 0 is low-grade-like (no enhancing tumour) and case 1 high-grade-like
    assert ids == ["LGG/Brats18_PH_00000_1", "HGG/Brats18_PH_00001_1"]
    for cid in ids:
        stem = Path(cid).name
        names = sorted(p.name for p in (tmp_path / cid).iterdir())
        assert names == sorted(f"{stem}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg"))
    _, seg_lgg = _load(tmp_path / ids[0] / "Brats18_PH_00000_1_seg.nii.gz")
    _, seg_hgg = _load(tmp_path / ids[1] / "Brats18_PH_00001_1_seg.nii.gz")
    assert 4 not in seg_lgg and set(np.unique(seg_lgg)) <= {0, 1, 2}
    assert set(np.unique(seg_hgg)) == {0, 1, 2, 4}


def test_brats2023_layout_names_and_enhancing_is_3(tmp_path):
    ids = phantom.generate(tmp_path, num_cases=2, seed=0, layout="brats2023", shape=SMALL)
    assert ids == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000"]
    cid = ids[1]
    names = sorted(p.name for p in (tmp_path / cid).iterdir())
    assert names == sorted(f"{cid}-{m}.nii.gz" for m in ("t1n", "t1c", "t2w", "t2f", "seg"))
    case = phantom.make_case(phantom.case_seed(0, 1), SMALL)
    _, seg = _load(tmp_path / cid / f"{cid}-seg.nii.gz")
    np.testing.assert_array_equal(seg, case["label"])  # BraTS 2023 uses the internal 0/1/2/3 values
    assert set(np.unique(seg)) == {0, 1, 2, 3}
    _, t1c = _load(tmp_path / cid / f"{cid}-t1c.nii.gz")
    np.testing.assert_array_equal(t1c, np.rint(case["t1ce"]).astype(np.int16))


def test_msd_layout_4d_channel_order_labels_and_dataset_json(tmp_path):
    import json

    ids = phantom.generate(tmp_path, num_cases=2, seed=0, layout="msd", shape=SMALL)
    assert ids == ["BRATS_001", "BRATS_002"]
    img, data = _load(tmp_path / "imagesTr" / "BRATS_002.nii.gz")
    assert data.shape == (*SMALL, 4) and data.dtype == np.int16
    np.testing.assert_array_equal(img.affine, phantom.brats_affine(SMALL))
    case = phantom.make_case(phantom.case_seed(0, 1), SMALL)
    for channel, mod in enumerate(("flair", "t1", "t1ce", "t2")):  # MSD order: FLAIR, T1w, T1gd, T2w
        np.testing.assert_array_equal(data[..., channel], np.rint(case[mod]).astype(np.int16))
    _, seg = _load(tmp_path / "labelsTr" / "BRATS_002.nii.gz")
    # MSD: 1 oedema, 2 non-enhancing tumour, 3 enhancing tumour
    np.testing.assert_array_equal(seg == 1, case["label"] == 2)
    np.testing.assert_array_equal(seg == 2, case["label"] == 1)
    np.testing.assert_array_equal(seg == 3, case["label"] == 3)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert meta["labels"]["1"] == "edema" and meta["numTraining"] == 2
    assert meta["training"][0] == {"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}


# ------------------------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_arrays_and_other_seed_differs():
    a, b, c = phantom.make_case(3, SMALL), phantom.make_case(3, SMALL), phantom.make_case(4, SMALL)
    for key in (*phantom.MODALITIES, "label"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["t2"], c["t2"])


def test_case_does_not_depend_on_num_cases(tmp_path):
    phantom.generate(tmp_path / "one", num_cases=1, seed=7, shape=SMALL)
    phantom.generate(tmp_path / "two", num_cases=2, seed=7, shape=SMALL)
    for m in ("t2", "seg"):
        name = f"BraTS2021_00000/BraTS2021_00000_{m}.nii.gz"
        np.testing.assert_array_equal(_load(tmp_path / "one" / name)[1], _load(tmp_path / "two" / name)[1])


# ----------------------------------------------------------------------------------------------- contrast
def test_healthy_tissue_contrast_orderings(full_case):
    means = phantom.region_means(full_case)
    csf, gm, wm = means["csf"], means["gm"], means["wm"]
    assert wm["t1"] > gm["t1"] > csf["t1"]  # T1: WM > GM > CSF
    assert csf["t2"] > gm["t2"] > wm["t2"]  # T2: CSF > GM > WM
    assert csf["flair"] < gm["flair"] and csf["flair"] < wm["flair"]  # FLAIR suppresses CSF
    assert csf["flair"] < 0.5 * wm["flair"]


def test_tumour_contrasts(full_case):
    means = phantom.region_means(full_case)
    wm, oedema, enh, core = means["wm"], means["oedema"], means["enhancing"], means["necrosis_or_core"]
    assert oedema["flair"] > 1.5 * wm["flair"]  # oedema bright in FLAIR
    assert oedema["t2"] > 1.5 * wm["t2"]  # and in T2
    # the enhancing rim is bright only after contrast: T1ce / WM well above T1 / WM
    assert enh["t1ce"] / wm["t1ce"] > 1.2 * enh["t1"] / wm["t1"]
    assert enh["t1ce"] > wm["t1ce"]
    assert core["t1ce"] < 0.6 * wm["t1ce"]  # necrosis stays dark


# ------------------------------------------------------------------------------ T1 versus T1ce, healthy
# Real BraTS T1 (2D spin echo, thick slices) and T1ce (3D gradient echo) differ everywhere, not only in the
# tumour; a modality classifier must be able to tell them apart on slices without enhancing tumour.
def test_t1ce_has_stronger_gm_wm_contrast_and_darker_csf_than_t1(full_case):
    means = phantom.region_means(full_case)  # healthy voxels only (label 0, no vessels)
    gm = {m: means["gm"][m] / means["wm"][m] for m in ("t1", "t1ce")}
    csf = {m: means["csf"][m] / means["wm"][m] for m in ("t1", "t1ce")}
    assert gm["t1"] - gm["t1ce"] > 0.05  # measured 0.81 vs 0.65
    assert csf["t1"] - csf["t1ce"] > 0.08  # measured 0.41 vs 0.22
    assert 0.55 < gm["t1ce"] < 0.75 and 0.1 < csf["t1ce"] < 0.3
    assert 0.65 < gm["t1"] < 0.9 and 0.25 < csf["t1"] < 0.5


def test_contrast_uptake_outside_the_tumour_shows_in_t1ce_only(full_case):
    """Enhancing vessels, choroid plexus and dura: bright in T1ce, not in T1, and not in the label map."""
    label, uptake = full_case["label"], full_case["uptake"]
    healthy = full_case["brain"] & (label == 0)
    vessels = uptake > 0.5
    assert vessels.sum() > 5000  # measured about 19000 voxels
    assert np.all(label[vessels] == 0)  # not tumour
    assert np.all(uptake[~full_case["brain"]] == 0)
    wm = healthy & (full_case["wm"] >= 0.9) & (uptake < 0.01)
    not_wm = healthy & (full_case["wm"] < 0.5)
    counts = {}
    for m in ("t1", "t1ce"):
        ratio = full_case[m][vessels] / full_case[m][wm].mean()
        # healthy voxels that are mostly GM or CSF yet brighter than the brightest 0.5 % of white matter
        brighter = int((full_case[m][not_wm] > np.percentile(full_case[m][wm], 99.5)).sum())
        counts[m] = (int((ratio > 1.1).sum()), brighter)
    assert counts["t1ce"][0] > 500 and counts["t1"][0] <= 5  # measured 2100 and 0
    assert counts["t1ce"][1] > 300 and counts["t1"][1] <= 5  # measured 1000 and 0


def _flattened(image, mask, sigma=10.0):
    """``image`` divided by its local brain mean (removes the smooth bias field)."""
    from scipy import ndimage

    m = mask.astype(np.float64)
    local = ndimage.gaussian_filter(image * m, sigma) / np.maximum(ndimage.gaussian_filter(m, sigma), 1e-3)
    return image / np.maximum(local, 1e-3)


def test_t1ce_is_not_a_rescaled_t1_on_tumour_free_slices(full_case):
    """Classifier-free separability proxy: T1 and T1ce of a tumour-free slice are not linearly related.

    Both slices are bias-flattened and smoothed by 1 voxel (to remove the independent bias fields and noise);
    their correlation over the inner brain was 0.984-0.994 when T1ce had T1's contrast (4 cases), and is now
    about 0.93 here (0.92-0.975 over those cases).
    """
    from scipy import ndimage

    brain, label = full_case["brain"], full_case["label"]
    tumour_free = ~(label > 0).any(axis=(0, 1))
    k = int(np.argmax(brain.sum(axis=(0, 1)) * tumour_free))  # the largest tumour-free slice
    mask = brain[:, :, k]
    a, b = (ndimage.gaussian_filter(_flattened(full_case[m][:, :, k].astype(np.float64), mask), 1.0)
            for m in ("t1", "t1ce"))
    inner = ndimage.binary_erosion(mask, iterations=4)
    assert inner.sum() > 10_000
    assert np.corrcoef(a[inner], b[inner])[0, 1] < 0.965


def test_t1_has_thick_slices_and_more_noise_than_t1ce(full_case):
    """T1: thick axial slices (blurred along z) and noisier; T1ce: a sharp, high-resolution 3D scan."""
    from scipy import ndimage

    brain = full_case["brain"]
    inner = ndimage.binary_erosion(brain, iterations=3)
    wm = inner & (full_case["wm"] >= 0.95) & (full_case["label"] == 0) & (full_case["uptake"] < 0.01)
    z_over_x, noise = {}, {}
    for m in ("t1", "t1ce"):
        image = full_case[m]
        # edge strength along z versus along x, each measured after smoothing across the other axes (noise)
        dz = np.diff(ndimage.gaussian_filter(image, (1.5, 1.5, 0)), axis=2)[inner[:, :, 1:] & inner[:, :, :-1]]
        dx = np.diff(ndimage.gaussian_filter(image, (0, 1.5, 1.5)), axis=0)[inner[1:] & inner[:-1]]
        z_over_x[m] = np.abs(dz).mean() / np.abs(dx).mean()
        # noise: voxel-to-voxel variation in white matter, relative to its mean
        residual = image - ndimage.uniform_filter(image, 3)
        noise[m] = residual[wm].std() / image[wm].mean()
    assert z_over_x["t1"] < 0.93 * z_over_x["t1ce"]  # measured 0.83 vs 0.96
    assert noise["t1"] > 1.3 * noise["t1ce"]


def test_tumour_compartments_are_nested(full_case):
    from scipy import ndimage

    label = full_case["label"]
    necrosis, core = label == 1, np.isin(label, (1, 3))
    # necrosis sits inside the enhancing rim: its neighbours are (almost) all tumour core
    ring = ndimage.binary_dilation(necrosis) & ~necrosis
    assert core[ring].mean() > 0.97
    # the core sits inside oedema: brain voxels just outside the core are mostly oedema
    shell = ndimage.binary_dilation(core, iterations=2) & ~core & full_case["brain"]
    assert (label[shell] == 2).mean() > 0.6


def test_contrast_varies_between_cases_so_no_fixed_lookup_table():
    a, b = phantom.make_case(1, SMALL), phantom.make_case(2, SMALL)
    ratio = lambda c: phantom.region_means(c)["gm"]["flair"] / phantom.region_means(c)["gm"]["t2"]  # noqa: E731
    assert abs(ratio(a) - ratio(b)) / ratio(a) > 0.01
    # within one case, voxels of equal (rounded) T2 map to many FLAIR values
    t2, flair = np.rint(a["t2"][a["brain"]] / 20), a["flair"][a["brain"]]
    common = np.bincount(t2.astype(int)).argmax()
    assert flair[t2 == common].std() > 0.02 * flair.mean()


def test_some_cases_have_little_or_no_tumour():
    fractions, kinds = [], []
    for seed in range(10):
        case = phantom.make_case(seed, MEDIUM)
        fractions.append((case["label"] > 0).sum() / case["brain"].sum())
        kinds.append(case["kind"])
    assert min(fractions) < 0.005  # a small or no tumour: absent from most slices
    assert max(fractions) > 0.02  # but tumours are usually sizeable
    assert {"small", "none"} & set(kinds)


def test_about_a_quarter_of_cases_have_small_or_no_tumour():
    kinds = [phantom.make_case(seed, (32, 32, 24))["kind"] for seed in range(40)]
    share = sum(k in ("none", "small") for k in kinds) / len(kinds)
    assert 0.1 <= share <= 0.45
    assert "hgg" in kinds and "lgg" in kinds


# ------------------------------------------------------------------------------------------------ domains
def _orders(table: dict, modality: str) -> set:
    """Pairs (darker, brighter) of tissues whose means differ in ``table`` for ``modality``."""
    tissues = list(table)
    return {(a, b) for a in tissues for b in tissues if table[a][modality] < table[b][modality]}


@pytest.mark.parametrize("domain", ["randomised", "shifted"])
def test_randomised_contrast_tables_keep_each_modality_tissue_ordering(domain):
    base = {t: dict(zip(phantom.MODALITIES, v)) for t, v in phantom.BASE_CONTRAST.items()}
    spread = {m: [] for m in phantom.MODALITIES}
    for seed in range(400):
        table = phantom._domain_contrast(np.random.default_rng(seed), phantom.DOMAIN_RANGES[domain])
        for m in phantom.MODALITIES:
            assert _orders(base, m) <= _orders(table, m), (seed, m)
            spread[m].append(table["gm"][m] / table["wm"][m])
    for m in phantom.MODALITIES:  # and the tables do vary: GM/WM ratios spread by more than the fixed +-10 %
        assert np.std(np.log(spread[m])) > 0.1, m


@pytest.mark.parametrize("domain", ["randomised", "shifted"])
def test_randomised_images_keep_healthy_tissue_ordering(domain):
    # darkest first; FLAIR's GM/WM gap (0.58 vs 0.45 in the table) is kept in the tables (above) but may be lost
    # in the images of this coarse grid to partial volume with the dark CSF beside the cortex, so only CSF counts
    expected = {"t1": ("csf", "gm", "wm"), "t1ce": ("csf", "gm", "wm"), "t2": ("wm", "gm", "csf"),
                "flair": ("csf", "wm"), "flair ": ("csf", "gm")}
    for seed in range(6):
        means = phantom.region_means(phantom.make_case(phantom.case_seed(3, seed, domain), MEDIUM, domain))
        for m, order in expected.items():
            values = [means[t][m.strip()] for t in order]
            assert values == sorted(values), (domain, seed, m, values)


def test_fixed_domain_keeps_the_contrast_table_within_its_jitter():
    table = phantom.make_case(5, (32, 32, 24), "fixed")["contrast"]
    for t, row in phantom.BASE_CONTRAST.items():
        for m, v in zip(phantom.MODALITIES, row):
            assert abs(table[t][m] / v - 1) <= phantom.CONTRAST_JITTER_CLIP + 1e-9, (t, m)


def test_randomised_tumours_include_multifocal_and_large_oedema_cases():
    cases = [phantom.make_case(seed, MEDIUM) for seed in range(12)]
    multifocal = [c for c in cases if c["lesions"] > 1]
    assert multifocal, [c["lesions"] for c in cases]
    parts = [ndimage.label(c["label"] > 0)[1] for c in multifocal]
    assert max(parts) >= 2  # separate foci (a satellite may also touch the main lesion)
    share = lambda c: (c["label"] == 2).sum() / max((c["label"] > 0).sum(), 1)  # noqa: E731
    assert max(share(c) for c in cases) > 0.8  # some tumours are mostly oedema


def test_shifted_cases_never_reuse_a_training_seed():
    training = {phantom.case_seed(s, i) for s in range(20) for i in range(200)}
    held_out = {phantom.case_seed(s, i, "shifted") for s in range(20) for i in range(200)}
    assert not training & held_out


def test_domain_is_recorded_and_an_unknown_one_is_refused(tmp_path):
    phantom.generate(tmp_path / "ood", num_cases=1, seed=0, shape=(32, 32, 24), domain="shifted")
    assert json.loads((tmp_path / "ood" / "phantom.json").read_text())["domain"] == "shifted"
    with pytest.raises(ValueError, match="valid domains are: randomised, fixed, shifted"):
        phantom.generate(tmp_path / "bad", num_cases=1, shape=(32, 32, 24), domain="ood")


# ------------------------------------------------------------------------------------------------- errors
def test_unknown_layout_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="brats2018, brats2021, brats2023, msd"):
        phantom.generate(tmp_path, num_cases=1, layout="brats2020", shape=SMALL)


@pytest.mark.parametrize("num_cases", [0, -3, 1.5])
def test_bad_num_cases_is_rejected(tmp_path, num_cases):
    with pytest.raises(ValueError, match="num_cases"):
        phantom.generate(tmp_path, num_cases=num_cases, shape=SMALL)


def test_bad_shape_and_seed_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        phantom.generate(tmp_path, num_cases=1, shape=(64, 64))
    with pytest.raises(ValueError, match="seed"):
        phantom.make_case(-1, SMALL)


# --------------------------------------------------------------------------------------------- CLI, figure
def test_runs_as_a_script_with_fire(tmp_path):
    script = BUNDLE / "scripts" / "phantom.py"
    cmd = [sys.executable, str(script), "--output_dir", str(tmp_path), "--num_cases", "1", "--seed", "0",
           "--layout", "brats2023", "--shape", "[64,64,48]"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    _, data = _load(tmp_path / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t2w.nii.gz")
    assert data.shape == SMALL


def test_a_folder_that_is_not_empty_is_refused_in_one_line_unless_overwrite(tmp_path):
    """Fewer cases never mix with an earlier, larger run: the command stops with one line and writes nothing;
    ``--overwrite true`` removes what the earlier phantom run wrote (and nothing else) before writing."""
    out = tmp_path / "data"
    phantom.generate(out, num_cases=2, seed=0, shape=(24, 24, 24))
    (out / "notes.txt").write_text("mine")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    cmd = [sys.executable, str(BUNDLE / "scripts" / "phantom.py"), "--output_dir", str(out), "--num_cases", "1",
           "--seed", "0", "--shape", "[24,24,24]"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"phantom.py: {out} is not empty (4 entries: BraTS2021_00000, BraTS2021_00001, notes.txt, ...): give "
        "--overwrite true to replace an earlier phantom set there, or another --output_dir"
    )
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    subprocess.run([*cmd, "--overwrite", "true"], check=True, capture_output=True, timeout=120)
    assert sorted(p.name for p in out.iterdir()) == ["BraTS2021_00000", "notes.txt", "phantom.json"]
    assert json.loads((out / "phantom.json").read_text())["cases"] == ["BraTS2021_00000"]


def test_phantom_figure_writes_png(tmp_path):
    phantom.generate(tmp_path / "data", num_cases=2, seed=0, layout="brats2021", shape=MEDIUM)
    out = phantom_figure(tmp_path / "data" / "BraTS2021_00001", tmp_path / "fig" / "case.png")
    data = Path(out).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # explicit slice and a brats2023 folder also work
    phantom.generate(tmp_path / "d23", num_cases=1, seed=0, layout="brats2023", shape=SMALL)
    out = phantom_figure(tmp_path / "d23" / "BraTS-GLI-00000-000", tmp_path / "b.png", slice_index=20)
    assert Path(out).stat().st_size > 5_000


def test_worker_processes_write_the_same_cases(tmp_path):
    from scripts.phantom import generate

    ids_one = generate(tmp_path / "one", num_cases=3, seed=4, shape=(48, 48, 24), workers=1)
    ids_two = generate(tmp_path / "two", num_cases=3, seed=4, shape=(48, 48, 24), workers=2)
    assert ids_one == ids_two
    for case in ids_one:
        for f in sorted((tmp_path / "one" / case).iterdir()):
            assert f.read_bytes() == (tmp_path / "two" / case / f.name).read_bytes(), f.name
    with pytest.raises(ValueError, match="workers"):
        generate(tmp_path / "bad", num_cases=1, workers=-1)


def test_physics_contrasts_follow_the_signal_equations_and_null_csf_in_flair():
    """Each draw is a full tissue x modality table; FLAIR's inversion time sits at CSF's null point (within 5 %), so
    CSF stays dark in FLAIR while the tissue orderings of the other modalities are free to vary between draws."""
    from scripts.phantom import MODALITIES, TISSUES, _physics_contrast

    tables = [_physics_contrast(np.random.default_rng(i)) for i in range(30)]
    for table in tables:
        assert set(table) == set(TISSUES) and all(table[t][m] > 0 for t in TISSUES for m in MODALITIES)
        assert table["csf"]["flair"] < 0.3 * max(table[t]["flair"] for t in TISSUES)
        assert table["csf"]["t2"] == max(table[t]["t2"] for t in TISSUES[:3])  # fluid brightest of CSF/GM/WM in T2
    orders = {tuple(sorted(TISSUES, key=lambda t: table[t]["t1"])) for table in tables}
    assert len(orders) > 1  # no ordering imposed: T1's tissue order varies between cases


def test_physics_cases_come_from_their_own_seed_stream():
    from scripts.phantom import case_seed

    assert len({case_seed(0, 3, d) for d in ("randomised", "shifted", "physics")}) == 3
    assert case_seed(0, 3, "fixed") == case_seed(0, 3, "randomised")


def test_asking_again_for_the_cases_a_folder_holds_does_nothing(tmp_path, capsys):
    """README's main job is run again as it is: the same request finds its cases there and writes nothing."""
    out = tmp_path / "d"
    phantom.generate(str(out), num_cases=1, seed=0, shape=(48, 48, 24))
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert phantom.generate(str(out), num_cases=1, seed=0, shape=(48, 48, 24)) == ["BraTS2021_00000"]
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == written
    with pytest.raises(FileExistsError, match="--overwrite true"):
        phantom.generate(str(out), num_cases=2, seed=0, shape=(48, 48, 24))

"""Tri-planar synthesis (``scripts.runtime.views``, ``--views``, ``--flip``, ``--uncertainty``): each view's slicing
and reassembly returns the input grid, training slices are the slices inference runs, fusing passes that agree
equals one pass with zero spread, and the uncertainty files sit on the input's grid with 0 outside the brain."""

from __future__ import annotations

import json
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE, CONFIGS, REPO, brain, save_generator, save_nifti
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor

from scripts.runtime.data import SliceDataset
from scripts.runtime.inference import BrainSliceInferer, SaveTargetsd, SplitSpreadd, uncertainty_path
from scripts.runtime.views import VIEWS, from_view, parse_views, to_view, view_length, view_slice


@pytest.mark.parametrize(
    "value, expected",
    [("axial", ("axial",)), ("all", VIEWS), ("Sagittal, axial", ("axial", "sagittal")), (["coronal"], ("coronal",)),
     (1, ("axial",)), (3, VIEWS)],
)  # fmt: skip
def test_views_are_parsed_in_a_fixed_order(value, expected):
    assert parse_views(value) == expected


@pytest.mark.parametrize("value", ["axial,oblique", "", 2, True, []])
def test_an_unknown_view_is_one_clear_error(value):
    with pytest.raises(ValueError, match="view"):
        parse_views(value)


@pytest.mark.parametrize("shape", [(2, 9, 9, 7), (1, 12, 12, 19), (3, 8, 8, 8)])
@pytest.mark.parametrize("view", VIEWS)
def test_each_view_is_square_in_plane_and_comes_back_on_the_input_grid(shape, view):
    volume = torch.rand(shape)
    v = to_view(volume, view)
    assert v.shape[1] == v.shape[2] == shape[1]
    assert v.shape[-1] == view_length(shape, view)
    back = from_view(v, view, shape[-1])
    assert back.shape == volume.shape
    if view == "axial" or shape[-1] == shape[1]:  # no resizing: exact
        assert torch.equal(back, volume)
    flat = volume[..., :1].expand(shape).contiguous()  # constant along the resized axis: exact after interpolation
    assert torch.allclose(from_view(to_view(flat, view), view, shape[-1]), flat, atol=1e-6)


@pytest.mark.parametrize("view", VIEWS)
def test_one_slice_of_a_view_is_that_slice_of_the_whole_view_from_a_tensor_or_a_memory_map(view, tmp_path):
    volume = torch.rand(2, 10, 10, 7)
    label = torch.randint(0, 4, (1, 10, 10, 7)).float()
    np.save(tmp_path / "v.npy", volume.numpy())
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    whole, labels = to_view(volume, view), to_view(label, view, mode="nearest")
    for i in range(whole.shape[-1]):
        assert torch.equal(view_slice(volume, view, i), whole[..., i])
        assert torch.equal(view_slice(mapped, view, i), whole[..., i])
        assert set(view_slice(label, view, i, mode="nearest").unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
        assert torch.equal(view_slice(label, view, i, mode="nearest"), labels[..., i])


def _case(seed: int = 0, shape=(16, 16, 11)):
    g = torch.Generator().manual_seed(seed)
    image = -torch.ones(4, *shape)
    image[:, 3:13, 2:14, 2:9] = torch.rand(4, 10, 12, 7, generator=g) * 2 - 1
    label = torch.zeros(1, *shape)
    label[:, 6:9, 6:9, 4:6] = 2
    return {"image": image, "label": label}


def test_axial_training_slices_are_unchanged_and_carry_no_view():
    case = _case()
    axial = SliceDataset([case])
    assert len(axial) == 11 and "view" not in axial[0]
    assert torch.equal(axial[4]["image"], case["image"][..., 4])


def test_tri_planar_training_draws_each_views_slices_of_the_whole_volume():
    case = _case()
    data = SliceDataset([case], views="all", context=3)
    views = [data.index[i][1] for i in range(len(data))]
    assert set(views) == set(VIEWS)
    for i in range(len(data)):
        _, view, s = data.index[i]
        item = data[i]
        assert item["view"] == view and item["image"].shape == (4, 16, 16) and item["source"].shape == (3, 16, 16)
        whole = to_view(case["image"], view)
        assert torch.equal(item["image"], whole[..., s])
        depth = whole.shape[-1]
        assert torch.equal(item["source"][1], whole[3, ..., s])  # the T2 slice in the middle of its neighbours
        assert torch.equal(item["source"][0], whole[3, ..., max(s - 1, 0)])
        assert torch.equal(item["source"][2], whole[3, ..., min(s + 1, depth - 1)])
        assert set(item["label"].unique().tolist()) <= {0.0, 2.0}
    mapped = SliceDataset([{k: v.numpy() for k, v in case.items()}], views="all", context=3)
    assert mapped.index == data.index
    assert all(torch.equal(mapped[i]["source"], data[i]["source"]) for i in range(len(data)))


class Recorder(torch.nn.Module):
    """A 2.5D network that keeps every input slice stack it is given."""

    in_channels = 3

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen += list(x)
        return x[:, 1:2].repeat(1, 3, 1, 1)


def test_inference_runs_the_slices_training_draws():
    """The same preprocessed volume through ``SliceDataset(views="all")`` and ``BrainSliceInferer(views="all")``:
    every training input (the T2 stack of a coronal or sagittal slice) is an input the inferer runs."""
    case = _case()
    data = SliceDataset([case], views="all", context=3)
    network = Recorder()
    BrainSliceInferer(views="all")(case["image"][3:4][None], network)
    seen = {tuple(np.round(x.numpy(), 5).ravel()) for x in network.seen}
    for i in range(len(data)):
        assert tuple(np.round(data[i]["source"].numpy(), 5).ravel()) in seen, data.index[i]


def test_the_whole_depth_is_cached_for_tri_planar_training():
    from scripts.runtime.data import SelectBrainSlicesd

    image = torch.zeros(4, 8, 8, 12)
    image[:, 1:7, 1:7, 3:8] = 1.0
    d = SelectBrainSlicesd("image", min_pixels=10, centre_key="centre", views="all")({"image": image})
    assert d["image"].shape[-1] == 12 and d["centre"].tolist() == [False] * 3 + [True] * 5 + [False] * 4
    axial = SelectBrainSlicesd("image", min_pixels=10, centre_key="centre")({"image": image})
    assert axial["image"].shape[-1] == 5


class Pointwise(torch.nn.Module):
    """A network whose output at a pixel depends on that pixel only: every view and flip agrees."""

    in_channels = 1

    def forward(self, x):
        return torch.cat([0.5 * x, -x, x.clamp(-0.5, 0.5)], dim=1)


def _flat_volume(shape=(1, 1, 16, 16, 11)):
    """A brain constant along the superior-inferior axis (every slice the same)."""
    volume = -torch.ones(shape)
    volume[..., 3:13, 2:14, :] = torch.rand(shape[:-1])[..., 3:13, 2:14, None] * 2 - 1
    return volume


def test_fusing_passes_that_agree_equals_one_pass_with_zero_spread():
    volume = _flat_volume()
    one = BrainSliceInferer(views="axial")(volume, Pointwise())
    fused = BrainSliceInferer(views="all", flip=True, uncertainty=True)(volume, Pointwise())
    assert fused.shape == (1, 6, 16, 16, 11)
    assert torch.allclose(fused[:, :3], one, atol=1e-5)
    assert float(fused[:, 3:].max()) < 1e-4
    without_axial = BrainSliceInferer(views="coronal,sagittal")(volume, Pointwise())
    assert torch.allclose(without_axial, one, atol=1e-5)


def test_passes_that_disagree_give_a_spread():
    torch.manual_seed(0)
    network = torch.nn.Conv2d(1, 3, 3, padding=1)
    network.in_channels = 1
    volume = -torch.ones(1, 1, 16, 16, 11)
    volume[..., 3:13, 2:14, 2:9] = torch.rand(1, 1, 10, 12, 7) * 2 - 1
    fused = BrainSliceInferer(views="all", flip=True, uncertainty=True)(volume, network)
    passes = list(BrainSliceInferer(views="all", flip=True).passes(volume[0], network))
    # a one-slice generator's mirrored sagittal pass would see the same slices: it is not run
    assert [(view, mirrored) for view, mirrored, _ in passes] == [
        ("axial", False), ("coronal", False), ("sagittal", False), ("axial", True), ("coronal", True)]
    stack = torch.stack([out for _, _, out in passes])
    assert stack.shape == (5, 3, 16, 16, 11)
    assert torch.allclose(fused[0, :3], stack.mean(0), atol=1e-5)
    assert torch.allclose(fused[0, 3:], stack.std(0, unbiased=False), atol=1e-5)
    assert float(fused[0, 3:].max()) > 0.01
    mirrored = list(BrainSliceInferer(views="axial", flip=True).passes(volume[0], network))
    assert torch.allclose(mirrored[1][2], network(volume[0].flip(1).permute(3, 0, 1, 2)).permute(1, 2, 3, 0).flip(1),
                          atol=1e-6)  # fmt: skip  (the mirror is along H, right-left, and undone)


def test_the_spread_is_split_off_in_output_units():
    pred = MetaTensor(torch.arange(8.0).reshape(4, 1, 1, 2))
    d = SplitSpreadd(enabled=True)({"pred": pred})
    assert torch.equal(d["pred"].as_tensor(), pred.as_tensor()[:2])
    assert torch.equal(d["uncertainty"].as_tensor(), pred.as_tensor()[2:] / 2)
    assert isinstance(d["uncertainty"], MetaTensor)
    assert SplitSpreadd(enabled=False)({"pred": pred}).keys() == {"pred"}
    with pytest.raises(RuntimeError, match="2 x C"):
        SplitSpreadd()({"pred": torch.zeros(3, 1, 1, 1)})


def test_the_uncertainty_maps_are_written_with_the_targets(tmp_path):
    ref = MetaTensor(torch.ones(1, 4, 4, 3), affine=torch.eye(4))
    d = {"pred": torch.rand(3, 4, 4, 3), "uncertainty": torch.rand(3, 4, 4, 3), "mask": ref, "case": "c1"}
    SaveTargetsd(output_dir=str(tmp_path))(d)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([f"c1_{t}.nii.gz" for t in ("flair", "t1", "t1ce")]
                           + [f"c1_{t}_uncertainty.nii.gz" for t in ("flair", "t1", "t1ce")])  # fmt: skip
    assert np.allclose(nib.load(tmp_path / "c1_t1_uncertainty.nii.gz").get_fdata(), d["uncertainty"][1].numpy())
    assert uncertainty_path("out/c1_t1.nii", ".nii") == "out/c1_t1_uncertainty.nii"


def _synthesise(output_dir, ckpt, **override):
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"), meta_file=str(CONFIGS / "metadata.json"), workflow_type="infer",
        bundle_root=str(BUNDLE), output_dir=str(output_dir), ckpt_path=str(ckpt), check_contrast=False, **override,
    )  # fmt: skip
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def test_the_fused_synthesis_and_its_uncertainty_are_on_the_input_grid_with_zero_background(tmp_path):
    """An LPS, anisotropic, odd-shaped input: every output and uncertainty map has its shape and affine; the maps
    are >= 0, 0 where the input is, and not 0 everywhere."""
    ckpt = save_generator(tmp_path / "model.pt", "tcmgan", in_channels=3, upsample="resize")
    t2 = brain((37, 41, 23))
    affine = np.diag([-0.9, -1.1, 2.5, 1.0])
    affine[:3, 3] = [40.0, 30.0, -20.0]
    path = save_nifti(tmp_path / "case_t2.nii.gz", t2, affine)
    _synthesise(tmp_path / "fused", ckpt, input=str(path), views="all", flip=True, uncertainty=True)
    _synthesise(tmp_path / "axial", ckpt, input=str(path))
    axial_files = sorted(p.name for p in (tmp_path / "axial").iterdir())
    assert axial_files == ["case_flair.nii.gz", "case_t1.nii.gz", "case_t1ce.nii.gz"]
    for target in ("flair", "t1", "t1ce"):
        for name in (f"case_{target}.nii.gz", f"case_{target}_uncertainty.nii.gz"):
            img = nib.load(tmp_path / "fused" / name)
            assert img.shape == t2.shape and np.allclose(img.affine, affine, atol=1e-4)
        spread = nib.load(tmp_path / "fused" / f"case_{target}_uncertainty.nii.gz").get_fdata()
        assert spread.min() >= 0 and np.all(spread[t2 <= 0] == 0) and spread.max() > 0
        fused = nib.load(tmp_path / "fused" / f"case_{target}.nii.gz").get_fdata()
        assert np.all(fused[t2 <= 0] == 0) and 0 <= fused.min() and fused.max() <= 1


def test_the_views_measurement_scores_both_syntheses_and_the_uncertainty(phantom_dir, tmp_path):
    """``tools/measure_views.py`` on one small case: every plane's scores for both syntheses and the baselines,
    the fused - axial differences, the uncertainty figures and the times, written as JSON with its figure."""
    sys.path.insert(0, str(REPO / "tools"))
    from measure_views import measure

    ckpt = save_generator(tmp_path / "model.pt", "tcmgan", in_channels=3, upsample="resize")
    result = measure(str(phantom_dir), str(ckpt), views="all", flip="true", max_cases=1,
                     output=str(tmp_path / "views.json"), figure=str(tmp_path / "views.png"))  # fmt: skip
    assert json.loads((tmp_path / "views.json").read_text())["cases"] == 1 and (tmp_path / "views.png").is_file()
    for target in ("flair", "t1", "t1ce"):
        scores = result["scores"][target]
        assert set(scores) == {"axial", "fused", "t2", "inverted_t2"}
        for metric in ("protocol_psnr", "protocol_ssim_axial", "protocol_ssim_coronal", "protocol_ssim_sagittal"):
            assert scores["fused"][metric]["n"] + scores["fused"][metric]["n_nan"] == 1
        assert np.isfinite(scores["fused"]["protocol_psnr"]["mean"])
        u = result["uncertainty"][target]
        assert -1 <= u["spearman"] <= 1 and u["top_decile_ratio"] > 0 and len(u["error_by_decile"]) == 10
    assert result["seconds_per_volume"]["fused"]["mean"] > 0 and result["time_ratio"] > 0


def test_spearman_uses_average_ranks_for_ties():
    sys.path.insert(0, str(REPO / "tools"))
    from measure_views import calibration, ranks, spearman

    assert ranks(np.array([3.0, 1.0, 1.0, 2.0])).tolist() == [3.0, 0.5, 0.5, 2.0]
    x = np.arange(100.0)
    assert spearman(x, x**3) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)
    c = calibration(x, 2 * x)
    assert c["error_by_decile"][0] < c["error_by_decile"][-1] and c["top_decile_ratio"] == pytest.approx(189 / 99)

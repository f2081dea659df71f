"""Specification of the recommended model's pieces (#13): the 2.5D input (k neighbouring T2 slices, built by one
function in training, inference and evaluation, edges included), the brain-slice filter that keeps the neighbours,
the source augmentation of ``recommended.json`` (background kept, spatial changes applied alike to source, targets and
label), resize-convolution upsampling, and the ``recommended.json`` overlay end to end."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIGS, TINY, brain, run_workflow, save_nifti

from scripts.runtime.checkpoints import load_model, read_model
from scripts.runtime.data import SelectBrainSlicesd, SliceDataset, neighbour_slices
from scripts.runtime.inference import BrainSliceInferer
from scripts.runtime.networks import Pix2PixUNet, SynthesisNet


def _numbered(shape=(8, 8, 10), brain_slices=range(3, 7)) -> torch.Tensor:
    """(4, H, W, D) volume whose every voxel of axial slice z holds z + 1 on the brain slices, 0 elsewhere."""
    vol = torch.zeros((4, *shape))
    for z in brain_slices:
        vol[..., z] = z + 1
    return vol


def test_neighbour_slices_stacks_the_neighbours_and_clamps_at_the_edges():
    vol = _numbered(brain_slices=range(10))[3]  # slice z holds z + 1
    stacks = neighbour_slices(vol, torch.tensor([0, 4, 9]), 3)
    assert stacks.shape == (3, 3, 8, 8)
    assert stacks[:, :, 0, 0].tolist() == [[1, 1, 2], [4, 5, 6], [9, 10, 10]]
    assert neighbour_slices(vol, torch.tensor([1]), 5)[0, :, 0, 0].tolist() == [1, 1, 2, 3, 4]
    assert torch.equal(neighbour_slices(vol, torch.tensor([4]), 1)[0, 0], vol[..., 4])


def test_brain_filter_keeps_the_neighbours_and_marks_the_slices_that_passed():
    data = {"image": _numbered(), "label": torch.zeros(1, 8, 8, 10)}
    out = SelectBrainSlicesd(["image", "label"], min_pixels=10, margin=2, centre_key="centre")(data)
    assert out["image"][0, 0, 0].tolist() == [0, 0, 4, 5, 6, 7, 0, 0]  # slices 1..8: 2 more on each side
    assert out["centre"].tolist() == [False, False, True, True, True, True, False, False]
    # at the volume's edge the margin stops there (inference clamps at the same place)
    edge = SelectBrainSlicesd(["image"], min_pixels=10, margin=2, centre_key="centre")({"image": _numbered(brain_slices=range(0, 3))})
    assert edge["image"].shape[-1] == 5 and edge["centre"].tolist() == [True, True, True, False, False]
    # without a margin: the paper's filter, all marked
    plain = SelectBrainSlicesd(["image"], min_pixels=10, centre_key="centre")({"image": _numbered()})
    assert plain["image"].shape[-1] == 4 and plain["centre"].all()


@pytest.mark.parametrize("brain_slices", [range(3, 7), range(0, 4)])
def test_training_and_inference_stack_the_same_neighbours(brain_slices):
    """The training item of each kept slice holds exactly the stack inference feeds the network for that slice."""
    raw = _numbered(brain_slices=brain_slices)
    kept = SelectBrainSlicesd(["image", "label"], min_pixels=10, margin=1, centre_key="centre")(
        {"image": raw, "label": torch.zeros(1, 8, 8, 10)})
    items = list(SliceDataset([kept], context=3))
    assert len(items) == len(brain_slices)  # only the slices that passed the filter are drawn

    seen = []

    class Recorder(torch.nn.Module):
        in_channels = 3

        def forward(self, x):
            seen.append(x.clone())
            return x[:, 1:2].repeat(1, 3, 1, 1)

    BrainSliceInferer(background=0.0)(raw[3:4][None], Recorder())
    fed = {int(stack[1, 0, 0]) - 1: stack for stack in torch.cat(seen) if stack[1].any()}  # centre slice -> stack
    for item in items:
        z = int(item["source"][1, 0, 0]) - 1  # the original slice index of the item's centre
        assert torch.equal(item["source"], fed[z]), z
        assert torch.equal(item["source"][1], item["image"][3])  # the centre is the item's own T2 slice


def test_inference_sends_the_slices_next_to_the_brain_when_the_network_looks_at_neighbours():
    inferer = BrainSliceInferer(background=0.0)
    vol = _numbered()[3:4]
    assert inferer.brain_slices(vol).tolist() == [3, 4, 5, 6]
    assert inferer.brain_slices(vol, context=3).tolist() == [2, 3, 4, 5, 6, 7]
    assert inferer.brain_slices(vol, context=5).tolist() == [1, 2, 3, 4, 5, 6, 7, 8]


# --------------------------------------------------------------------------------------------- augmentation
def _augmentation():
    """recommended.json's augmentation list, instantiated as the training dataset does."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "recommended.json")])
    return parser.get_parsed_content("augmentation", instantiate=True)


def test_augmentation_keeps_the_background_and_moves_source_targets_and_label_alike():
    from monai.transforms import Compose

    augment = Compose(_augmentation())
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    inside = (xx**2 + (yy / 0.8) ** 2) < 0.7
    blob = ((xx - 0.3) ** 2 + yy**2) < 0.05  # an off-centre "tumour": any flip or rotation moves it
    t2 = torch.where(inside, 0.2 + 0.5 * (xx + 1) / 2 + 0.2 * blob, torch.tensor(-1.0))
    image = torch.stack([torch.where(inside, 0.5 * blob.float(), torch.tensor(-1.0))] * 3 + [t2])
    for seed in range(12):
        augment.set_random_state(seed)
        item = augment({"source": t2[None].repeat(3, 1, 1), "image": image.clone(), "label": blob[None].float()})
        source, img, label = item["source"], item["image"], item["label"]
        assert set(item) == {"source", "image", "label"}
        assert source.shape == (3, 64, 64) and img.shape == (4, 64, 64) and label.shape == (1, 64, 64)
        background = img[3] <= -0.999  # where the (spatially moved) T2 has no brain
        assert (source[:, background] == -1).all()  # exactly background in the augmented source too
        assert (source[:, ~background] > -1).all() and source.max() <= 1
        # the label moved with the targets: the tumour in FLAIR (channel 0) is where the label says
        tumour_in_flair = img[0] > 0.25
        overlap = (tumour_in_flair & (label[0] > 0.5)).sum() / max(int((label[0] > 0.5).sum()), 1)
        assert overlap > 0.8, seed


def test_the_mirror_flips_left_right_half_the_time_and_never_a_sagittal_slice():
    from monai.transforms import Compose

    from scripts.runtime.data import RandMirrord

    mirror = Compose([RandMirrord(["source", "image", "label"], prob=0.5)])
    ramp = torch.arange(8.0).reshape(1, 8, 1).expand(1, 8, 4)  # rises along the first in-plane axis
    flips = {"axial": 0, "sagittal": 0}
    for view in flips:
        for seed in range(40):
            mirror.set_random_state(seed)
            item = mirror({"source": ramp.clone(), "image": ramp.repeat(4, 1, 1), "label": ramp.clone(), "view": view})
            flipped = bool(item["source"][0, 0, 0] == 7)
            assert all(bool(item[k][0, 0, 0] == (7 if flipped else 0)) for k in ("image", "label"))  # alike
            flips[view] += flipped
    assert 10 <= flips["axial"] <= 30 and flips["sagittal"] == 0
    assert any(isinstance(t, RandMirrord) for t in _augmentation())  # the training augmentation's mirror


# ------------------------------------------------------------------------------------------------- upsampling
def test_resize_upsampling_has_no_transposed_convolution_and_keeps_the_shapes():
    net = Pix2PixUNet(4, 1, features=4, num_downs=7, upsample="resize")
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in net.modules())
    assert net(torch.zeros(2, 4, 128, 128)).shape == (2, 1, 128, 128)
    with pytest.raises(ValueError, match="unknown upsample"):
        Pix2PixUNet(4, upsample="pixelshuffle")


# ------------------------------------------------------------------------------------------ recommended model
@pytest.fixture(scope="module")
def recommended_run(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("recommended")
    run_workflow(["train.json", "recommended.json"], dataset_dir=str(phantom_dir), output_dir=str(out),
                 variant="mgan", **TINY)  # fmt: skip
    return out


def test_recommended_overlay_trains_a_2_5d_resize_conv_model_that_says_so(recommended_run):
    ckpt = recommended_run / "recommended" / "model.pt"
    arch = read_model(str(ckpt), "generator")
    assert (arch["in_channels"], arch["upsample"]) == (3, "resize")
    recommended = json.loads((CONFIGS / "recommended.json").read_text())
    assert recommended["context"] == 3 and len(recommended["augmentation"]) > 5
    assert json.loads((CONFIGS / "train.json").read_text())["augmentation"] == []  # the paper's variants: none
    assert isinstance(load_model(str(ckpt)), SynthesisNet)


def test_recommended_model_infers_in_the_input_grid_with_exact_background(recommended_run, tmp_path):
    t2 = brain((40, 44, 30))
    affine = np.diag([1.2, 1.1, 2.0, 1.0])
    save_nifti(tmp_path / "case_t2.nii.gz", t2, affine)
    out = tmp_path / "out"
    run_workflow("inference.json", input=str(tmp_path / "case_t2.nii.gz"), output_dir=str(out),
                 ckpt_path=str(recommended_run / "recommended" / "model.pt"))  # fmt: skip
    for target in ("flair", "t1", "t1ce"):
        img = nib.load(str(out / f"case_{target}.nii.gz"))
        data = np.asarray(img.dataobj)
        assert data.shape == t2.shape and np.allclose(img.affine, affine)
        assert (data[t2 == 0] == 0).all()  # background stays exactly background


@pytest.mark.parametrize("view", ["axial", "sagittal"])
def test_synthesis_figure_shows_axial_and_sagittal_views(recommended_run, phantom_dir, tmp_path, view):
    """The figure of #13: the synthesis beside the real targets with the tumour outlined, in both views."""
    from figures import synthesis_figure

    out = tmp_path / "inference"
    run_workflow("inference.json", dataset_dir=str(phantom_dir), output_dir=str(out),
                 ckpt_path=str(recommended_run / "recommended" / "model.pt"))  # fmt: skip
    png = synthesis_figure(str(phantom_dir), str(out), str(tmp_path / f"{view}.png"), view=view)
    assert png.endswith(f"{view}.png") and (tmp_path / f"{view}.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="view must be"):
        synthesis_figure(str(phantom_dir), str(out), str(tmp_path / "x.png"), view="coronal")

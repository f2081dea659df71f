"""Specification of the MONAI Label path: bundle/scripts/monailabel_bundles.py (the export of one inference bundle
per target) and bundle/configs/monailabel.json. (Its one-target network, ``SingleTargetSynthesisNet``, is
specified in ``test_networks.py``.)

MONAI Label itself is not installed; :func:`monailabel_infer` does what its ``BundleInferTask`` (monailabel 0.8.5,
``tasks/infer/bundle.py`` and ``basic_infer.py``) does with a local bundle, step by step, and :func:`restored` what
its appended ``Restored`` transform and writer read.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE, REPO, brain, run_workflow, save_nifti
from monai.bundle import ConfigItem, ConfigParser
from monai.transforms import Compose, LoadImaged, SaveImaged

from scripts.monailabel_bundles import export
from scripts.runtime.networks import TARGETS

SCHEMA = REPO / "tests" / "data" / "meta_schema_20240725.json"
#: a non-RAS, anisotropic, off-origin grid (axis codes L, P, S), not a multiple of 128 in-plane
AFFINE = np.array([[-1.1, 0, 0, 50.0], [0, -0.9, 0, 60.0], [0, 0, 2.0, -10.0], [0, 0, 0, 1]])
SHAPE = (50, 60, 14)
NAMES = {"flair": "FLAIR", "t1": "T1", "t1ce": "T1ce"}


@pytest.fixture(scope="module")
def exported(tcmgan_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("monailabel")
    export(str(out), ckpt_path=str(tcmgan_ckpt))
    return out


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> Path:
    """A T2-like ellipsoid with one octant cut away (so a flip or axis swap shows) in a zero background."""
    return save_nifti(tmp_path_factory.mktemp("t2") / "case_t2.nii.gz", brain(SHAPE, empty_top=False), AFFINE)


@pytest.fixture(scope="module")
def bundle_outputs(tcmgan_ckpt, volume, tmp_path_factory) -> dict:
    """The three targets as the bundle's own inference.json writes them ([0, 1] NIfTI on the input grid)."""
    out = tmp_path_factory.mktemp("inference")
    run_workflow("inference.json", workflow_type="infer", input=str(volume), output_dir=str(out),
                 ckpt_path=str(tcmgan_ckpt), device="cpu")  # fmt: skip
    return {t: np.asarray(nib.load(str(out / f"case_{t}.nii.gz")).dataobj) for t in TARGETS}


@contextlib.contextmanager
def bundle_on_path(bundle: Path):
    """MONAI Label's ``sys.path.insert(0, bundle)`` + ``unload_module("scripts")``, undone afterwards."""
    saved = {name: mod for name, mod in sys.modules.items() if name == "scripts" or name.startswith("scripts.")}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(bundle))
    try:
        yield
    finally:
        sys.path.remove(str(bundle))
        for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def monailabel_infer(bundle: Path, image: Path, device: str = "cpu") -> dict:
    """One inference request of MONAI Label's ``BundleInferTask`` on a local bundle; returns its data dict."""
    with bundle_on_path(bundle):
        config = ConfigParser()
        config.read_config(str(bundle / "configs" / "inference.json"))
        config.config.update({"bundle_root": str(bundle)})  # type: ignore[union-attr]
        network = config.get_parsed_content("network_def", instantiate=True)
        # BasicInferTask._get_network
        checkpoint = torch.load(str(bundle / "models" / "model.pt"), map_location=device)
        loaded = network.load_state_dict(checkpoint.get("model", checkpoint), strict=False)
        assert not loaded.missing_keys and not loaded.unexpected_keys  # strict=False would hide a mismatch
        network.to(device).eval()
        # BundleInferTask._update_device: "device" becomes the request's device name
        config.config.update({"device": device})  # type: ignore[union-attr]
        config.ref_resolver.items["device"] = ConfigItem(config=device, id="device")
        pre = config.get_parsed_content("preprocessing", instantiate=True)
        pre = list(pre.transforms) if isinstance(pre, Compose) else pre
        assert isinstance(pre[0], LoadImaged)  # wrapped in LoadImageTensord, which calls it on the image path
        data = {"image": str(image), "image_path": str(image), "device": device, "result_dtype": "uint8"}
        for t in pre:
            data = t(data)
        inferer = config.get_parsed_content("inferer", instantiate=True)
        with torch.no_grad():
            outputs = inferer(data["image"][None].to(torch.device(device)), network)
        data["pred"] = outputs[0]
        post = config.get_parsed_content("postprocessing", instantiate=True)
        post = list(post.transforms) if isinstance(post, Compose) else post
        for t in [t for t in post if not isinstance(t, SaveImaged)]:
            data = t(data)
    return data


def restored(data: dict) -> tuple[np.ndarray, np.ndarray]:
    """What MONAI Label's ``Restored(keys="pred", ref_image="image")`` and writer produce: the volume and affine.

    ``Restored`` resizes with nearest neighbour when the prediction is not at the loaded image's
    ``spatial_shape``; here the bundle's own ``Invertd`` must already have restored it, so that is an error.
    """
    meta = data["image"].meta
    pred = data["pred"]
    assert tuple(pred.shape[1:]) == tuple(meta["spatial_shape"]), "MONAI Label would resize (nearest neighbour)"
    assert pred.shape[0] == 1, "a multi-channel result is written as a segmentation"
    return np.asarray(pred[0]), np.asarray(meta["original_affine"])


def test_export_writes_one_inference_bundle_per_target(exported, tcmgan_ckpt):
    schema = json.loads(SCHEMA.read_text())
    for target in TARGETS:
        bundle = exported / f"brainsynth_{target}"
        assert {p.name for p in (bundle / "configs").iterdir()} == {"inference.json", "metadata.json", "logging.conf"}
        assert (bundle / "models" / "model.pt").read_bytes() == tcmgan_ckpt.read_bytes()
        assert (bundle / "LICENSE").is_file()
        # the runtime modules only: no phantom, benchmark, reproduce, figure or export code
        shipped = {p.relative_to(bundle / "scripts").as_posix() for p in (bundle / "scripts").rglob("*.py")}
        runtime = {p.relative_to(BUNDLE / "scripts").as_posix() for p in (BUNDLE / "scripts" / "runtime").glob("*.py")}
        assert shipped == runtime | {"__init__.py"}
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())
        jsonschema.validate(meta, schema)
        pred = meta["network_data_format"]["outputs"]["pred"]
        assert pred["num_channels"] == 1 and pred["channel_def"] == {"0": NAMES[target]}  # MONAI Label's label name
        config = json.loads((bundle / "configs" / "inference.json").read_text())
        assert config["target"] == target and "evaluator" not in config and "dataset" not in config


@pytest.mark.parametrize("target", TARGETS)
def test_monailabel_gets_one_channel_in_0_255_on_the_input_grid(exported, volume, bundle_outputs, target):
    data = monailabel_infer(exported / f"brainsynth_{target}", volume)
    image, affine = restored(data)
    t2 = np.asarray(nib.load(str(volume)).dataobj)

    assert image.shape == SHAPE and image.dtype == np.float32
    np.testing.assert_allclose(affine, AFFINE, atol=1e-6)
    assert image.min() >= 0 and image.max() <= 255
    assert np.all(image[t2 <= 0] == 0) and image[t2 > 0].max() > 0
    np.testing.assert_array_equal(image, np.round(image))  # whole grey levels: the clients' uint8 cast is exact
    np.testing.assert_array_equal(image.astype(np.uint8), image)
    # the same synthesis as the bundle's own inference, only scaled: geometry and intensities agree voxel by voxel
    np.testing.assert_allclose(image, bundle_outputs[target] * 255, atol=0.5 + 1e-3)


def test_command_line_exports_the_shipped_model(tmp_path):
    res = subprocess.run(
        [sys.executable, "bundle/scripts/monailabel_bundles.py", "--output_dir", str(tmp_path), "--targets", "t1ce"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == f"{tmp_path}/brainsynth_t1ce: T1ce from T2 (tcmgan, features 16)"
    assert [p.name for p in tmp_path.iterdir()] == ["brainsynth_t1ce"]


def test_export_refuses_an_unknown_target(tmp_path, tcmgan_ckpt):
    with pytest.raises(ValueError, match="unknown targets"):
        export(str(tmp_path), ckpt_path=str(tcmgan_ckpt), targets="flair,t2")


def test_the_uncertainty_bundles_return_the_maps_of_the_bundles_own_inference(tcmgan_ckpt, volume, tmp_path):
    """``--uncertainty true`` adds ``<prefix>_<target>_uncertainty``: MONAI Label gets the map that inference.json
    writes beside the synthesis (same passes), scaled [0, 0.25] -> [0, 255], on the input grid, 0 outside the brain."""
    export(str(tmp_path / "ml"), ckpt_path=str(tcmgan_ckpt), targets="t1ce", flip=True, uncertainty=True)
    assert sorted(p.name for p in (tmp_path / "ml").iterdir()) == ["brainsynth_t1ce", "brainsynth_t1ce_uncertainty"]
    run_workflow("inference.json", workflow_type="infer", input=str(volume), output_dir=str(tmp_path / "own"),
                 ckpt_path=str(tcmgan_ckpt), device="cpu", flip=True, uncertainty=True, targets="t1ce")  # fmt: skip
    own = np.asarray(nib.load(str(tmp_path / "own" / "case_t1ce_uncertainty.nii.gz")).dataobj)
    image, affine = restored(monailabel_infer(tmp_path / "ml" / "brainsynth_t1ce_uncertainty", volume))
    t2 = np.asarray(nib.load(str(volume)).dataobj)
    np.testing.assert_allclose(affine, AFFINE, atol=1e-6)
    assert image.shape == SHAPE and np.all(image[t2 <= 0] == 0) and image.max() > 0
    np.testing.assert_array_equal(image, np.round(image))
    np.testing.assert_allclose(image, np.clip(own / 0.25, 0, 1) * 255, atol=0.5 + 1e-3)
    synthesis, _ = restored(monailabel_infer(tmp_path / "ml" / "brainsynth_t1ce", volume))
    flipped = np.asarray(nib.load(str(tmp_path / "own" / "case_t1ce.nii.gz")).dataobj)
    np.testing.assert_allclose(synthesis, flipped * 255, atol=0.5 + 1e-3)  # the synthesis bundle runs the same passes
    meta = json.loads((tmp_path / "ml" / "brainsynth_t1ce_uncertainty" / "configs" / "metadata.json").read_text())
    jsonschema.validate(meta, json.loads(SCHEMA.read_text()))
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "T1ce uncertainty"}


def test_an_uncertainty_map_of_one_pass_is_refused(tmp_path, tcmgan_ckpt):
    with pytest.raises(ValueError, match="several passes"):
        export(str(tmp_path), ckpt_path=str(tcmgan_ckpt), uncertainty=True)

"""The generator's output calibration: the monotone map (networks.IntensityCalibration) and its fit on cases with
real targets (runtime/calibration.py, configs/calibrate.json)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import SMALL_MIN_PIXELS, run_workflow

from scripts.runtime.checkpoints import load_checkpoint, load_model
from scripts.runtime.networks import CALIBRATION_QUANTILES, IntensityCalibration, SynthesisNet

K = len(CALIBRATION_QUANTILES)


def _knots(rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    source = torch.sort(torch.rand(rows, K, generator=g) * 2 - 1, dim=1).values + torch.arange(K) * 1e-3
    target = torch.sort(torch.rand(rows, K, generator=g) * 2 - 1, dim=1).values
    return source, target


def test_the_map_is_linear_between_knots_and_clamped_outside_them():
    calibration = IntensityCalibration(2)
    source, target = _knots(2)
    calibration.set_knots(source, target)
    y = torch.rand(4, 1, 6, 6) * 2.4 - 1.2  # beyond [-1, 1] too
    labels = torch.tensor([0, 1, 1, 0])
    expected = np.stack([np.interp(y[i].numpy(), source[k].numpy(), target[k].numpy())
                         for i, k in enumerate(labels.tolist())])  # fmt: skip
    np.testing.assert_allclose(calibration(y, labels).numpy(), expected, atol=1e-5)


def test_until_fitted_the_map_is_the_identity_and_an_older_model_loads_as_it():
    y, labels = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    assert torch.equal(IntensityCalibration(3)(y, labels), y)
    net = SynthesisNet("mgan", features=4)
    net.calibration.set_knots(*_knots(3))
    older = {k: v for k, v in SynthesisNet("mgan", features=4).state_dict().items() if not k.startswith("calibration")}
    net.load_state_dict(older)  # strict: the missing knots are filled in as the identity
    assert net.calibration.identity


def test_knots_must_increase_and_have_the_network_shape():
    calibration = IntensityCalibration(3)
    source, target = _knots(3)
    with pytest.raises(ValueError, match="increase strictly"):
        calibration.set_knots(source.flip(1), target)
    with pytest.raises(ValueError, match="shape"):
        calibration.set_knots(source[:2], target[:2])


def test_the_fit_brings_the_synthesis_brain_quantiles_to_the_real_ones_and_is_saved(phantom_dir, generator_ckpt,
                                                                                       tmp_path):  # fmt: skip
    model = tmp_path / "mgan" / "model.pt"
    model.parent.mkdir()
    shutil.copy(generator_ckpt, model)
    wf = run_workflow("calibrate.json", dataset_dir=str(phantom_dir), output_dir=str(tmp_path), variant="mgan",
                      ckpt_path=str(model), calibrate_num_cases=2, min_brain_pixels=SMALL_MIN_PIXELS)  # fmt: skip
    report = wf.parser.get_parsed_content("calibration")
    assert report["cases"] == 2 and report["split"] == "seg"
    calibrated = load_model(str(model))
    assert not calibrated.calibration.identity
    assert "calibration.source" in load_checkpoint(str(model))
    top = CALIBRATION_QUANTILES.index(99.5)
    for k, name in enumerate(("flair", "t1", "t1ce")):
        synthesis, real = np.array(report[name]["synthesis"]), np.array(report[name]["real"])
        mapped = np.interp(synthesis, calibrated.calibration.source[k].numpy(), calibrated.calibration.target[k].numpy())
        # the untrained generator's quantiles are far from the real ones; mapped, they are the real ones
        assert abs(mapped[top] - real[top]) < 1e-3 and abs(synthesis[top] - real[top]) > 1e-2


def test_an_any_missing_generator_is_refused(tmp_path, phantom_dir):
    from scripts.runtime.calibration import fit_calibration
    from scripts.runtime.networks import AnyMissingNet

    path = tmp_path / "anymissing.pt"
    torch.save(AnyMissingNet(features=4).state_dict(), path)
    with pytest.raises(ValueError, match="calibration"):
        fit_calibration(str(path), str(phantom_dir), "seg", None, None)


def test_a_calibrated_generator_runs_the_same_through_onnx_runtime():
    from test_inference import volume_with_empty_slices

    from scripts.runtime.inference import BrainSliceInferer

    torch.manual_seed(0)
    net = SynthesisNet("tcmgan", features=4).eval()
    net.calibration.set_knots(*_knots(3, seed=1))
    vol = volume_with_empty_slices(depth=5, empty=(0,))
    with torch.no_grad():
        expected = BrainSliceInferer(sw_batch_size=4)(vol, net)
    onnx = BrainSliceInferer(sw_batch_size=4, backend="onnxruntime")
    got = onnx(vol, net)
    assert onnx.runner.last_engine == "onnxruntime"
    # random knots have slopes of up to ~50: the engines' 1e-6 differences come out up to 50 times larger
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

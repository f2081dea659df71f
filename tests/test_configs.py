"""Specification of the workflow configs as a whole (bundle/configs/*.json): ``train.json`` and ``inference.json``
stand alone, every other config is an overlay on ``train.json`` (the model zoo's list form) that holds only what
differs, the pieces ``inference.json`` repeats do not drift from ``train.json``, and the settings a generator was
trained with come from its ``model.pt``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BUNDLE, CONFIGS, error_chain, overlay_bases, run_workflow

from scripts.runtime.checkpoints import ModelSaver
from scripts.runtime.networks import SynthesisNet

BASE = "train.json"
OVERLAYS = (
    "train_segmenter.json",
    "evaluate.json",
    "validate.json",
    "train_downstream.json",
    "evaluate_downstream.json",
    "multi_gpu_train.json",
    "recommended.json",
    "calibrate.json",
)


def load(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


#: overlays of inference.json
INFERENCE_OVERLAYS = ("multi_gpu_inference.json",)


def test_every_workflow_config_is_train_or_inference_or_a_named_overlay():
    workflows = {p.name for p in CONFIGS.glob("*.json")} - {"metadata.json", "monailabel.json"}
    assert workflows == {BASE, "inference.json", *OVERLAYS, *INFERENCE_OVERLAYS}


@pytest.mark.parametrize("overlay", INFERENCE_OVERLAYS)
def test_inference_overlay_holds_only_what_differs_from_inference_json(overlay):
    base, layer = load("inference.json"), load(overlay)
    assert layer["+config_stack"] == [overlay] and base["config_stack"] == ["inference.json"]
    same = [k for k, v in layer.items() if not k.startswith("+") and base.get(k, object()) == v]
    assert same == [], f"{overlay} repeats {same} of inference.json"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_holds_only_what_differs_from_train_json(overlay):
    base, layer = load(BASE), load(overlay)
    assert layer["+config_stack"] == [overlay]
    same = [k for k, v in layer.items() if not k.startswith("+") and base.get(k, object()) == v]
    assert same == [], f"{overlay} repeats {same} of {BASE}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_given_alone_stops_with_the_list_form(overlay):
    """The old single-file form loads (its ``"+train": {}`` entries merge into nothing) and stops in
    ``initialize`` with one line naming the command form to use (``sys.exit``: no traceback on the command line)."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=str(CONFIGS / overlay), workflow_type=None, bundle_root=str(BUNDLE))
    with pytest.raises(SystemExit) as info:
        wf.initialize()
    bases = overlay_bases(overlay)
    form = "--config_file \"[" + ",".join(f"'bundle/configs/{c}'" for c in [*bases, overlay]) + "]\""
    give = "both" if len(bases) == 1 else "all of them"
    assert str(info.value) == (f"{overlay} is an overlay of {' + '.join(bases)} and cannot run alone; give {give}, "
                               f"in the model zoo list form: {form}")


def test_a_stacked_overlay_without_the_overlay_below_it_stops_with_the_full_form():
    """``train_downstream.json`` stacks on ``train_segmenter.json`` (a segmenter training with another network and
    inputs); the two-file form stops in the guard's one line, before any check of a GAN's segmenter."""
    from monai.bundle import ConfigWorkflow

    assert overlay_bases("train_downstream.json") == ["train.json", "train_segmenter.json"]
    files = [str(CONFIGS / c) for c in ("train.json", "train_downstream.json")]
    wf = ConfigWorkflow(config_file=files, workflow_type=None, bundle_root=str(BUNDLE))
    with pytest.raises(SystemExit, match="give all of them.*train_segmenter.json','bundle/configs/train_downstream"):
        wf.initialize()


def test_overlay_given_alone_on_the_command_line_prints_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    command = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", "bundle", "--config_file",
               "bundle/configs/evaluate.json"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("evaluate.json is an overlay of train.json")


def test_inference_repeats_train_json_preprocessing_and_generator_exactly():
    """``inference.json`` must stand alone (the zoo's checks and MONAI Label read it without ``train.json``), so it
    repeats the image preparation and the generator definition: any drift fails here."""
    train, infer = load(BASE), load("inference.json")
    preprocessing = infer["preprocessing"]["transforms"]
    assert preprocessing[-len(train["image_transforms"]) :] == train["image_transforms"]
    assert infer["network_def"] == train["network_def"]
    label = load("monailabel.json")["network_def"]
    assert {k: v for k, v in label.items() if k != "target"} == {**train["network_def"], "_target_": label["_target_"]}


@pytest.fixture
def slice_scaled_ckpt(tmp_path):
    """A tiny generator trained (saved) with ``intensity_scaling="slice"`` and ``image_size=64``."""
    path = tmp_path / "model.pt"
    torch.manual_seed(0)
    net = SynthesisNet("mgan", features=4, image_size=64, intensity_scaling="slice")
    ModelSaver(net, str(path))(engine=None)  # no evaluator: saves
    return path


def test_inference_takes_image_size_and_scaling_from_the_checkpoint(slice_scaled_ckpt, tmp_path):
    wf = run_workflow("inference.json", workflow_type="infer", run=False, ckpt_path=str(slice_scaled_ckpt),
                      output_dir=str(tmp_path))  # fmt: skip
    net = wf.parser.get_parsed_content("network")
    assert (net.image_size, net.intensity_scaling) == (64, "slice")
    transforms = wf.parser.get_parsed_content("preprocessing").transforms
    resize = next(t for t in transforms if type(t).__name__ == "Resized")
    assert tuple(resize.resizer.spatial_size) == (64, 64, -1)
    assert [t.mode for t in transforms if type(t).__name__ == "ScaleBrainIntensityd"] == ["slice"]


@pytest.mark.parametrize("config", ["inference.json", "evaluate.json", "validate.json"])
@pytest.mark.parametrize("override", [{"intensity_scaling": "volume"}, {"image_size": 128}])
def test_an_option_that_contradicts_the_checkpoint_is_an_error(config, override, slice_scaled_ckpt, tmp_path):
    wf = run_workflow(config, workflow_type=None, run=False, ckpt_path=str(slice_scaled_ckpt),
                      output_dir=str(tmp_path), **override)  # fmt: skip
    (key, value), = override.items()
    found = {"intensity_scaling": "'slice'", "image_size": "64"}[key]
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("network")
    chain = [str(e) for e in error_chain(info.value, context=False)]
    assert any(f"the checkpoint has {key} {found} (the workflow asks {value!r})" in m and "drop the option" in m
               for m in chain), chain  # fmt: skip

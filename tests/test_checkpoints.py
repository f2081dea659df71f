"""Specification of checkpoint loading, bundle/scripts/runtime/checkpoints.py, through each way the bundle loads one
(inference.json's ``ckpt_path``, train.json's ``segmenter_ckpt``, the ``checkpoint.pt`` of ``--resume``):
weights only (a pickle that would run code is refused), and a wrong, corrupt or mismatching file gets an error that
names it and says what it holds.

(Writing checkpoints atomically, also under SIGKILL, is specified in ``test_reliability.py``; an override of
inference.json that contradicts the checkpoint in ``test_inference.py``.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE, CONFIGS, root_cause, save_generator, train_workflow, truncated
from monai.bundle import ConfigWorkflow

from scripts.runtime.checkpoints import TrainingCheckpoint, load_model, read_model, save_atomic
from scripts.runtime.networks import SynthesisNet, TumourSegmenter

INFERENCE = CONFIGS / "inference.json"


class CodeOnLoad:
    """Pickles as a call to ``Path.touch(marker)``: loading it without ``weights_only`` creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _save_training_checkpoint(wf) -> None:
    """Write the workflow's checkpoint.pt (trainer, networks, optimizers, schedulers) without training."""
    wf.parser.get_parsed_content("train#trainer")  # attaches the handlers
    handler = next(h for h in wf.parser.get_parsed_content("train#handlers") if isinstance(h, TrainingCheckpoint))
    handler.save()


def _load_through(entry: str, path: Path, phantom_dir, tmp_path):
    """Make the bundle load ``path`` as ``entry``: inference's ckpt_path, train.json's segmenter_ckpt, or the
    checkpoint.pt of ``--resume``."""
    if entry == "inference ckpt_path":
        workflow = ConfigWorkflow(config_file=str(INFERENCE), workflow_type="infer", bundle_root=str(BUNDLE),
                                  ckpt_path=str(path), device="cpu")  # fmt: skip
        workflow.initialize()
        workflow.parser.get_parsed_content("network")
    elif entry == "segmenter_ckpt":
        train_workflow(phantom_dir, tmp_path / "run", "tcmgan", segmenter_ckpt=str(path)).parser.get_parsed_content(
            "seg_network"
        )
    else:
        target = tmp_path / "run" / "mgan" / "checkpoint.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        wf = train_workflow(phantom_dir, tmp_path / "run", resume=True)
        wf.run()


ENTRIES = ["inference ckpt_path", "segmenter_ckpt", "resume checkpoint.pt"]


@pytest.mark.parametrize("entry", ENTRIES)
def test_pickle_with_code_is_refused_with_a_clear_error(phantom_dir, tmp_path, entry):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"arch": torch.tensor([2, 4, 3, 7]), "trainer": {}, "payload": CodeOnLoad(marker)}, evil)
    with pytest.raises(Exception) as info:
        _load_through(entry, evil, phantom_dir, tmp_path)
    error = root_cause(info.value)
    assert isinstance(error, ValueError) and ": refused to load: " in str(error) and "weights-only" in str(error)
    assert Path(str(error).split(": refused to load")[0]).read_bytes() == evil.read_bytes()  # names the file
    assert "Unsupported global: GLOBAL" in str(error)  # and what it refused
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


@pytest.fixture
def checkpoints(phantom_dir, tmp_path):
    """A generator model.pt, a segmenter model.pt and a training checkpoint.pt of width 4, and truncated copies."""
    files = {"generator": save_generator(tmp_path / "g" / "model.pt"), "segmenter": tmp_path / "s" / "model.pt"}
    files["segmenter"].parent.mkdir()
    torch.save(TumourSegmenter(4).state_dict(), files["segmenter"])
    _save_training_checkpoint(train_workflow(phantom_dir, tmp_path / "t"))
    files["training"] = tmp_path / "t" / "mgan" / "checkpoint.pt"
    files["truncated"] = truncated(files["generator"], tmp_path / "truncated.pt")
    return files


WRONG_FILES = [
    # (entry, file given, the message says)
    ("inference ckpt_path", "segmenter", "is not a generator model.pt (SynthesisNet state dict, as training writes to "
     "<output_dir>/<variant>/model.pt) or an any-missing generator model.pt (AnyMissingNet state dict, as train.json "
     "--variant anymissing writes): it holds a segmenter, features 4"),
    ("inference ckpt_path", "training", "it holds a training checkpoint (a training checkpoint.pt: give the model.pt "
     "next to it)"),
    ("inference ckpt_path", "truncated", "corrupt or truncated"),
    ("segmenter_ckpt", "generator", "is not a segmenter model.pt (TumourSegmenter state dict, as train_segmenter.json "
     "writes): it holds a generator variant 'tcmgan', features 4"),
    ("segmenter_ckpt", "truncated", "corrupt or truncated"),
    ("resume checkpoint.pt", "generator", "is not a training checkpoint (it holds a generator variant 'tcmgan', "
     "features 4; --resume needs the checkpoint.pt written during training)"),
    ("resume checkpoint.pt", "truncated", "corrupt or truncated"),
]  # fmt: skip


@pytest.mark.parametrize("entry, given, message", WRONG_FILES)
def test_a_wrong_or_corrupt_checkpoint_gets_an_error_saying_what_it_is(checkpoints, phantom_dir, tmp_path, entry,
                                                                       given, message):  # fmt: skip
    with pytest.raises(Exception) as info:
        _load_through(entry, checkpoints[given], phantom_dir, tmp_path / "use")
    error = root_cause(info.value)
    assert isinstance(error, ValueError) and message in str(error), str(error)


def test_resume_with_another_width_names_both_architectures(phantom_dir, tmp_path):
    _save_training_checkpoint(train_workflow(phantom_dir, tmp_path))
    wf = train_workflow(phantom_dir, tmp_path, resume=True, features=8)
    with pytest.raises(Exception) as info:
        wf.run()
    error = root_cause(info.value)
    assert isinstance(error, ValueError)
    assert "another architecture" in str(error)
    assert "generator: checkpoint has generator variant 'mgan', features 4; this run has generator variant 'mgan', " \
           "features 8" in str(error)  # fmt: skip
    assert "critic: checkpoint has critic (with modality head), features 4" in str(error)


def test_segmenter_training_checkpoint_is_accepted_as_segmenter_ckpt(tmp_path):
    torch.manual_seed(0)
    net = TumourSegmenter(4)
    save_atomic({"network": net.state_dict(), "trainer": {"iteration": 1}}, str(tmp_path / "checkpoint.pt"))
    loaded = load_model(str(tmp_path / "checkpoint.pt"), kinds="segmenter")
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_checkpoint_with_weights_that_do_not_fit_its_arch_entry_is_reported_as_damaged(tmp_path):
    state = SynthesisNet("tcmgan", 4).state_dict()
    state["arch"] = torch.tensor([2, 8, 3, 7])  # claims width 8, holds width-4 tensors
    torch.save(state, tmp_path / "model.pt")
    assert read_model(str(tmp_path / "model.pt"), "generator")["features"] == 8
    with pytest.raises(ValueError, match="its weights do not fit the generator its 'arch' entry describes"):
        load_model(str(tmp_path / "model.pt"), network=SynthesisNet("tcmgan", 8))

"""Specification of training: bundle/configs/train.json with the GAN iteration of bundle/scripts/runtime/trainer.py
for every variant (frozen or updated segmenter, one generator per target for pix2pix, the loss terms it reports),
the learning-rate schedule, resume, the segmenter pre-training of train_segmenter.json, and the command line.

(The loss functions are specified in ``test_losses.py``, the networks in ``test_networks.py``, the data pipeline in
``test_data.py``; a run killed mid-epoch and resumed in ``test_reliability.py``.)
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time

import pytest
import torch
from conftest import BUNDLE, REPO, TINY, run_workflow, train_workflow
from ignite.engine import Events

from scripts.runtime.checkpoints import load_checkpoint
from scripts.runtime.networks import SynthesisNet, TumourSegmenter
from scripts.runtime.trainer import LOSS_KEYS, StepSchedule, loss_terms


def test_step_schedule_follows_the_paper():
    s = StepSchedule(100)
    assert [s(e) * 2e-4 for e in (0, 29, 30, 59, 60, 89, 90, 99)] == pytest.approx(
        [2e-4, 2e-4, 1e-4, 1e-4, 5e-5, 5e-5, 1e-5, 1e-5]
    )


def test_segmenter_pretraining_writes_a_rebuildable_model(segmenter_run):
    state = load_checkpoint(str(segmenter_run / "segmenter" / "model.pt"))
    assert state["arch"].tolist() == [TINY["features"], 3]
    TumourSegmenter(features=TINY["features"]).load_state_dict(state)


def _trained(variant, phantom_dir, out, **extra):
    wf = train_workflow(phantom_dir, out, variant, run=True, **extra)
    return wf, wf.parser.get_parsed_content("train#trainer")


def test_tcmgan_keeps_the_segmenter_frozen(phantom_dir, segmenter_run):
    before = load_checkpoint(str(segmenter_run / "segmenter" / "model.pt"))
    wf, trainer = _trained("tcmgan", phantom_dir, segmenter_run)
    s = wf.parser.get_parsed_content("seg_network")
    assert not s.training and not any(p.requires_grad for p in s.parameters())
    for k, v in s.state_dict().items():
        torch.testing.assert_close(v.cpu(), before[k].cpu(), msg=f"S changed in {k}")
    assert trainer.state.output["g_seg"] > 0  # the tumour-consistency term was computed
    assert (segmenter_run / "tcmgan" / "model.pt").is_file()


def test_tcmgan_bw_updates_the_segmenter(phantom_dir, segmenter_run):
    before = load_checkpoint(str(segmenter_run / "segmenter" / "model.pt"))
    wf, trainer = _trained("tcmgan_bw", phantom_dir, segmenter_run)
    s = wf.parser.get_parsed_content("seg_network")
    state = {k: v.cpu() for k, v in s.state_dict().items()}  # on the GPU when there is one
    changed = [k for k, v in state.items() if v.is_floating_point() and not torch.equal(v, before[k].cpu())]
    assert changed, "S was not updated"
    assert "s_loss" in trainer.state.output
    assert "segmenter" in load_checkpoint(str(segmenter_run / "tcmgan_bw" / "checkpoint.pt"))


def test_pix2pix_trains_one_generator_per_target(phantom_dir, tmp_path):
    torch.manual_seed(0)
    init = SynthesisNet("pix2pix", features=TINY["features"]).state_dict()
    wf, trainer = _trained("pix2pix", phantom_dir, tmp_path, epoch_length=6)
    g = wf.parser.get_parsed_content("gnetwork")
    assert len(g.generators) == 3 and not g.conditional
    assert g.generators[0].down[0][0].in_channels == 1  # no label planes
    for k in range(3):  # every target's generator was trained, each is its own module
        w = g.generators[k].down[0][0].weight
        assert not torch.equal(w.detach().cpu(), init[f"generators.{k}.down.0.0.weight"])
    assert len({id(m) for m in g.generators}) == 3
    assert trainer.state.output["g_cls"] == 0 and trainer.state.output["d_cls"] == 0  # no labels, no cls head
    assert len(wf.parser.get_parsed_content("dnetwork").critics) == 3


def test_loss_terms_stay_on_the_device_until_a_handler_reads_them(phantom_dir, tmp_path):
    """The iteration returns detached 0-d tensors (no per-iteration ``.item()``, which would make the CPU wait for
    the GPU); ``loss_terms``, the logging handlers' output transform, turns them into floats."""
    wf, trainer = _trained("mgan", phantom_dir, tmp_path)
    out = trainer.state.output
    tensors = {k: out[k] for k in LOSS_KEYS if k in out}
    assert set(tensors) == set(LOSS_KEYS) - {"s_loss"}
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in tensors.values())
    floats = loss_terms(out)
    assert all(type(v) is float for v in floats.values()) and floats.keys() == tensors.keys()
    assert floats == pytest.approx({k: v.item() for k, v in tensors.items()})
    assert floats["d_loss"] == pytest.approx(
        floats["d_real"] + floats["d_fake"] + 10 * floats["d_cls"] + 100 * floats["d_gp"], rel=1e-5, abs=1e-4
    )
    assert loss_terms({"g_loss": 1.5, "d_loss": torch.tensor(2.0), "fake": torch.zeros(2)}) == {
        "d_loss": 2.0, "g_loss": 1.5
    }  # fmt: skip


def test_mgan_has_no_segmenter(phantom_dir, tmp_path):
    wf, trainer = _trained("mgan", phantom_dir, tmp_path)
    assert wf.parser.get_parsed_content("seg_network") is None
    assert trainer.state.output["g_seg"] == 0 and trainer.state.output["g_cls"] > 0


def test_the_tumour_weight_of_l1_reaches_the_trainer_and_the_paper_keeps_none(phantom_dir, tmp_path):
    """``tumour_l1_weight`` (the recommended model's option, :func:`scripts.runtime.losses.l1_loss`) is 0 in the
    paper's variants and is handed to the trainer as given."""
    assert train_workflow(phantom_dir, tmp_path / "a").parser.get_parsed_content("train#trainer").tumour_l1_weight == 0
    wf = train_workflow(phantom_dir, tmp_path / "b", tumour_l1_weight=5.0)
    assert wf.parser.get_parsed_content("train#trainer").tumour_l1_weight == 5.0


def test_a_run_without_any_validation_still_writes_its_model(phantom_dir, tmp_path):
    """max_epochs below val_interval: no epoch is validated, so the last epoch is saved (with a warning)."""
    wf = train_workflow(phantom_dir, tmp_path, "mgan", run=True, val_interval=3)
    assert wf.parser.get_parsed_content("validate#evaluator").state.epoch == 0  # never validated
    assert (tmp_path / "mgan" / "model.pt").is_file()


def test_resume_restores_iteration_optimizer_and_schedule(phantom_dir, tmp_path):
    _trained("mgan", phantom_dir, tmp_path, max_epochs=4)
    saved = load_checkpoint(str(tmp_path / "mgan" / "checkpoint.pt"))
    assert saved["trainer"]["iteration"] == 4 * TINY["epoch_length"]

    wf = train_workflow(phantom_dir, tmp_path, "mgan", resume=True, max_epochs=5)
    trainer = wf.parser.get_parsed_content("train#trainer")
    seen = {}

    @trainer.on(Events.ITERATION_STARTED)
    def _capture(engine):  # the first iteration this run executes
        if seen:
            return
        seen["iteration"] = engine.state.iteration
        seen["g_opt"] = copy.deepcopy(wf.parser.get_parsed_content("goptimizer").state_dict())
        seen["lr"] = wf.parser.get_parsed_content("goptimizer").param_groups[0]["lr"]

    wf.run()
    assert seen["iteration"] == saved["trainer"]["iteration"] + 1  # continued where it stopped
    assert trainer.state.epoch == 5 and seen["g_opt"]["state"][0]["step"] == saved["g_optimizer"]["state"][0]["step"]
    for k, st in saved["g_optimizer"]["state"].items():
        torch.testing.assert_close(seen["g_opt"]["state"][k]["exp_avg"].cpu(), st["exp_avg"].cpu())
    # 4 of 5 epochs done: StepSchedule(5) has stepped 4 times -> factor for epoch 4 (>= 0.9 * 5 rounds to 4)
    assert seen["lr"] == pytest.approx(2e-4 * StepSchedule(5)(4))
    assert trainer.state.iteration == 5 * TINY["epoch_length"]


@pytest.mark.slow
@pytest.mark.parametrize("run_id", ["training", "run"])
def test_cli_run_ids(phantom_dir, tmp_path, run_id):
    """The design card's command line, from the repository root, for both run ids."""
    args = [sys.executable, "-m", "monai.bundle", "run", run_id, "--bundle_root", "bundle"]
    args += ["--config_file", "bundle/configs/train.json", "--dataset_dir", str(phantom_dir)]
    args += ["--output_dir", str(tmp_path), "--variant", "mgan"]
    for k, v in TINY.items():
        args += [f"--{k}", str(v)]
    res = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "mgan" / "model.pt").is_file() and (tmp_path / "mgan" / "checkpoint.pt").is_file()
    assert BUNDLE.exists()


# --- no silent overwrite -------------------------------------------------------------------------------------------


def test_a_rerun_into_a_finished_run_stops_before_any_work(phantom_dir, tmp_path):
    """A second run into the same ``--output_dir`` stops in ``initialize`` with one line, leaving the first run's
    model.pt as it was; ``--resume true`` and ``--overwrite true`` go on, and every run logs to its own
    TensorBoard folder."""
    train_workflow(phantom_dir, tmp_path, run=True)
    model = tmp_path / "mgan" / "model.pt"
    before = model.read_bytes()
    with pytest.raises(SystemExit) as info:
        train_workflow(phantom_dir, tmp_path)
    assert str(info.value) == (
        f"{model} holds the model of an earlier run: give --resume true to continue that run, --overwrite true to "
        "replace it, or another --output_dir"
    )
    assert model.read_bytes() == before and len(list((tmp_path / "mgan" / "tensorboard").iterdir())) == 1
    for option in ({"resume": True}, {"overwrite": True}):
        train_workflow(phantom_dir, tmp_path, **option)  # initialize passes
    time.sleep(1.1)  # the TensorBoard folder is named by the start time, to the second
    train_workflow(phantom_dir, tmp_path, run=True, overwrite=True)
    assert len(list((tmp_path / "mgan" / "tensorboard").iterdir())) == 2  # the two runs kept apart


def test_evaluation_overlays_do_not_refuse_an_existing_model(tcmgan_ckpt, phantom_dir, tmp_path):
    for overlay in ("evaluate.json", "validate.json"):
        run_workflow(overlay, workflow_type=None, run=False, dataset_dir=str(phantom_dir), ckpt_path=str(tcmgan_ckpt),
                     output_dir=str(tmp_path))  # fmt: skip

"""Specification of the bundle's reliability across its workflows (train.json, inference.json): a training run killed
mid-epoch resumes from its last checkpoint, a process killed while it writes a checkpoint or an output leaves no
partial file under the final name, and a bad case stops training before it starts (or is skipped when asked).

Every test makes its own data: the session's small phantom (``phantom_dir``, copied before it is damaged) and
networks of width 4. Three tests run the command line in a subprocess and kill it with SIGKILL.

(How a wrong or unsafe checkpoint is refused: ``test_checkpoints.py``; the atomic writer itself: ``test_files.py``;
the header check of a case's files: ``test_data.py``.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE, CONFIGS, REPO, TINY, root_cause, save_nifti, train_workflow, truncated
from monai.bundle import ConfigWorkflow

from scripts.runtime.checkpoints import load_checkpoint, save_atomic
from scripts.runtime.networks import TARGETS
from scripts.runtime.trainer import StepSchedule

INFERENCE = CONFIGS / "inference.json"
#: one torch thread in the subprocesses: two threads on a busy 2-core machine are several times slower
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_cli(*args: str) -> list[str]:
    command = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", "bundle"]
    return command + ["--config_file", "bundle/configs/train.json", *args]


def kill_when(process: subprocess.Popen, ready, timeout: float = 240.0, poll: float = 0.01) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` is true; fail if it ends or the time runs out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
            return
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"the process ended (code {process.returncode}) before it could be killed:\n{output[-3000:]}")
        time.sleep(poll)
    process.kill()
    pytest.fail("timed out waiting for the moment to kill the process")


# --- killed and resumed ------------------------------------------------------------------------------------------

EPOCH_LENGTH, MAX_EPOCHS, EVERY = 12, 4, 3


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_continues_from_the_last_checkpoint(phantom_dir, tmp_path):
    """A run killed after a mid-epoch checkpoint of its 2nd or later epoch restarts with ``--resume true`` from
    exactly that checkpoint: iteration count, optimizer state (Adam's step count) and LR schedule carry on."""
    args = ["--dataset_dir", str(phantom_dir), "--output_dir", str(tmp_path), "--variant", "mgan"]
    for k, v in {**TINY, "epoch_length": EPOCH_LENGTH, "max_epochs": MAX_EPOCHS}.items():
        args += [f"--{k}", str(v)]
    args += ["--checkpoint_every", str(EVERY), "--log_every", "1"]  # loss terms to TensorBoard every iteration
    ckpt = tmp_path / "mgan" / "checkpoint.pt"
    seen = {"mtime": None, "state": None}

    def mid_epoch_checkpoint() -> bool:
        if not ckpt.exists() or ckpt.stat().st_mtime_ns == seen["mtime"]:
            return False
        seen["mtime"] = ckpt.stat().st_mtime_ns
        seen["state"] = load_checkpoint(str(ckpt))  # also: every version seen on disk is complete
        it = seen["state"]["trainer"]["iteration"]
        return it > EPOCH_LENGTH and it % EPOCH_LENGTH != 0  # one epoch done, the next one half-way

    first = subprocess.Popen(train_cli(*args), cwd=REPO, env=ONE_THREAD, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    kill_when(first, mid_epoch_checkpoint)
    assert first.returncode == -signal.SIGKILL

    saved = load_checkpoint(str(ckpt))  # not truncated
    killed_at = saved["trainer"]["iteration"]
    assert killed_at % EPOCH_LENGTH != 0 and killed_at > EPOCH_LENGTH  # the kill came mid-epoch
    assert saved["g_optimizer"]["state"][0]["step"].item() == killed_at
    if (tmp_path / "mgan" / "model.pt").exists():
        load_checkpoint(str(tmp_path / "mgan" / "model.pt"))

    second = subprocess.run(train_cli(*args, "--resume", "true"), cwd=REPO, env=ONE_THREAD, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    epoch, total = killed_at // EPOCH_LENGTH, MAX_EPOCHS * EPOCH_LENGTH
    assert f"resumed from {ckpt} at epoch {epoch}, iteration {killed_at}" in log
    logged = iterations_logged_by_the_resumed_run(tmp_path / "mgan" / "tensorboard")
    assert logged == list(range(killed_at + 1, total + 1))  # the resumed run did exactly the missing iterations

    final = load_checkpoint(str(ckpt))
    assert final["trainer"]["iteration"] == total and final["trainer"]["max_epochs"] == MAX_EPOCHS
    # a fresh optimizer would have counted only the resumed run's steps (total - killed_at)
    assert final["g_optimizer"]["state"][0]["step"].item() == total
    assert final["d_optimizer"]["state"][0]["step"].item() == total  # d_train_steps = 1
    # the schedule stepped once per epoch over both runs; a fresh one would have missed the epochs before the kill
    assert final["g_scheduler"]["last_epoch"] == MAX_EPOCHS
    assert final["g_scheduler"]["_last_lr"][0] == pytest.approx(2e-4 * StepSchedule(MAX_EPOCHS)(MAX_EPOCHS))
    assert not [f for f in os.listdir(ckpt.parent) if f.endswith(".tmp")]  # the killed writer's leftovers are gone


def iterations_logged_by_the_resumed_run(log_dir: Path) -> list[int]:
    """Steps of the per-iteration TensorBoard scalars written by the run that did not start at iteration 1
    (each run's trainer writes its own event file; validation writes others, with one entry per epoch)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = []
    for path in log_dir.glob("**/events.out.tfevents.*"):  # one folder per run
        events = EventAccumulator(str(path))
        events.Reload()
        steps = [sorted(e.step for e in events.Scalars(tag)) for tag in events.Tags()["scalars"]]
        longest = max(steps, key=len, default=[])
        if longest and longest[0] > 1:
            runs.append(longest)
    return max(runs, key=len)  # the trainer's file; the resumed validation's has one step per epoch


_WRITER = """
import sys, torch
sys.path.insert(0, {bundle!r})
from scripts.runtime.checkpoints import save_atomic
i = 0
while True:
    i += 1
    save_atomic({{"version": torch.tensor(i), "weights": torch.full((12_000_000,), float(i))}}, {path!r})
"""


def test_checkpoint_file_is_never_truncated_by_sigkill(tmp_path):
    """A process killed while ``save_atomic`` writes (its temporary file exists) leaves the previous complete
    checkpoint under the final name; the next save removes the dead writer's temporary file."""
    path = tmp_path / "checkpoint.pt"
    code = _WRITER.format(bundle=str(BUNDLE), path=str(path))
    writer = subprocess.Popen([sys.executable, "-c", code], env=ONE_THREAD)

    def writing_a_later_version() -> bool:
        return path.exists() and any(f.startswith(".checkpoint.") for f in os.listdir(tmp_path))

    kill_when(writer, writing_a_later_version, poll=0.001)
    temporaries = [f for f in os.listdir(tmp_path) if f.startswith(".checkpoint.")]
    state = load_checkpoint(str(path))
    assert torch.all(state["weights"] == state["version"].float())  # one whole version, not a mix
    assert temporaries, "the kill did not land mid-write"
    save_atomic({"version": torch.tensor(0)}, str(path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


@pytest.mark.slow
def test_killed_inference_leaves_no_partial_nifti_under_a_final_name(tmp_path, tcmgan_ckpt):
    """Killed while it writes a case (240x240x80: ~18 MB per target), inference leaves only hidden temporary files;
    the next run writes the case completely and removes them."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (240, 240, 80)], indexing="ij")
    t2 = np.where(x**2 + y**2 + z**2 < 0.8, 200 + 800 * np.random.default_rng(0).random(x.shape), 0)
    src = save_nifti(tmp_path / "case1_t2.nii.gz", t2.astype(np.float32))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", "bundle", "--config_file", str(INFERENCE)]
    command += ["--input", str(src), "--output_dir", str(out), "--ckpt_path", str(tcmgan_ckpt), "--device", "cpu",
                "--check_contrast", "false"]  # a noise ball, not a T2
    run = subprocess.Popen(command, cwd=REPO, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)  # fmt: skip

    kill_when(run, lambda: out.exists() and any(f.endswith(".tmp.nii.gz") for f in os.listdir(out)), poll=0.002)
    left = os.listdir(out)
    assert left and all(f.startswith(".") and f.endswith(".tmp.nii.gz") for f in left), left

    workflow = ConfigWorkflow(config_file=str(INFERENCE), workflow_type="infer", bundle_root=str(BUNDLE),
                              input=str(src), output_dir=str(out), ckpt_path=str(tcmgan_ckpt),
                              device="cpu", check_contrast=False)  # fmt: skip
    workflow.initialize()
    workflow.run()
    assert sorted(os.listdir(out)) == sorted(f"case1_{t}.nii.gz" for t in TARGETS)
    assert all(nib.load(str(out / f)).shape == t2.shape for f in os.listdir(out))


# --- a bad case: named before training starts, or skipped -------------------------------------------------------


def _gan_case(data: Path) -> tuple[str, dict]:
    content = json.loads((data / "datalist.json").read_text())
    entry = content["gan"][0]
    return entry["case"], entry


def _damage(data: Path, how: str) -> Path:
    """Damage the first ``gan`` case of the copied data set; returns the damaged file."""
    case, entry = _gan_case(data)
    t1 = data / entry["image"][1]
    if how == "truncated gzip":
        truncated(t1)
    elif how == "not an image":
        t1.write_text("not an image")
    elif how == "missing file":
        t1.unlink()
    elif how == "another grid":
        save_nifti(t1, np.ones((40, 40, 20), np.float32))
    elif how == "no brain slice":  # readable and well formed; found only when the volume is preprocessed
        t2 = data / entry["image"][3]
        img = nib.load(str(t2))
        save_nifti(t2, np.zeros(img.shape, np.int16), img.affine)
        return t2
    return t1


@pytest.fixture
def copied_data(phantom_dir, tmp_path) -> Path:
    return Path(shutil.copytree(phantom_dir, tmp_path / "data"))


@pytest.mark.parametrize("how", ["truncated gzip", "not an image", "missing file", "another grid", "no brain slice"])
def test_bad_case_fails_before_training_starts_naming_case_and_file(copied_data, tmp_path, how):
    bad = _damage(copied_data, how)
    case, _ = _gan_case(copied_data)
    wf = train_workflow(copied_data, tmp_path / "out")
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("train#dataset")  # the data set is complete before the trainer exists
    error = root_cause(info.value)
    assert isinstance(error, (ValueError, FileNotFoundError))
    assert str(error).startswith(f"case {case}: ") and (str(bad) in str(error) or how == "another grid"), str(error)
    assert not (tmp_path / "out" / "mgan").exists()  # nothing trained, nothing written


def test_skip_bad_cases_leaves_the_case_out_with_a_warning_and_trains(copied_data, tmp_path, capfd):
    bad = _damage(copied_data, "truncated gzip")
    case, _ = _gan_case(copied_data)
    n_gan = len(json.loads((copied_data / "datalist.json").read_text())["gan"])
    wf = train_workflow(copied_data, tmp_path / "out", skip_bad_cases=True)
    wf.run()
    volumes = wf.parser.get_parsed_content("train#volumes")
    assert volumes.skipped == [case] and len(volumes) == n_gan - 1
    logged = "".join(capfd.readouterr())  # the bundle's logging.conf prints warnings to the console
    assert f"WARNING - skipping case {case} (skip_bad_cases is set): case {case}: {bad}: corrupt or truncated" in logged
    assert wf.parser.get_parsed_content("train#trainer").state.iteration == TINY["epoch_length"]


def test_skip_bad_cases_also_skips_a_case_that_fails_in_preprocessing(copied_data, tmp_path):
    _damage(copied_data, "no brain slice")
    case, _ = _gan_case(copied_data)
    wf = train_workflow(copied_data, tmp_path / "out", skip_bad_cases=True)
    volumes = wf.parser.get_parsed_content("train#volumes")
    assert volumes.skipped == [case]
    assert all(case not in str(item.get("case")) for item in volumes.data)

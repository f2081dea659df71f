"""Reliability: a run killed mid-epoch resumes from its last checkpoint, files are written atomically, checkpoints
load without running pickled code and say what is wrong with a wrong one, a bad case stops training before it
starts (or is skipped when asked).

Every test makes its own data: the session's small phantom (``phantom_dir``, copied before it is damaged) and
networks of width 4. Three tests run the command line in a subprocess and kill it with SIGKILL.
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
from conftest import REPO, TINY, run_workflow
from monai.bundle import ConfigWorkflow

from scripts.runtime.checkpoints import TrainingCheckpoint, load_checkpoint, load_segmenter, save_atomic, synthesis_arch
from scripts.runtime.networks import TARGETS, SynthesisNet, TumourSegmenter
from scripts.runtime.trainer import StepSchedule

BUNDLE = REPO / "bundle"
INFERENCE = BUNDLE / "configs" / "inference.json"
#: one torch thread in the subprocesses: two threads on a busy 2-core machine are several times slower
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception under MONAI's config, transform and engine wrappers."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


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
    for path in log_dir.glob("events.out.tfevents.*"):
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


def test_killed_inference_leaves_no_partial_nifti_under_a_final_name(tmp_path):
    """Killed while it writes a case (240x240x80: ~18 MB per target), inference leaves only hidden temporary files;
    the next run writes the case completely and removes them."""
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    torch.save(SynthesisNet("tcmgan", features=4).state_dict(), ckpt)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (240, 240, 80)], indexing="ij")
    t2 = np.where(x**2 + y**2 + z**2 < 0.8, 200 + 800 * np.random.default_rng(0).random(x.shape), 0)
    src = tmp_path / "case1_t2.nii.gz"
    nib.save(nib.Nifti1Image(t2.astype(np.float32), np.eye(4)), str(src))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", "bundle", "--config_file", str(INFERENCE)]
    command += ["--input", str(src), "--output_dir", str(out), "--ckpt_path", str(ckpt), "--device", "cpu"]
    run = subprocess.Popen(command, cwd=REPO, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)  # fmt: skip

    kill_when(run, lambda: out.exists() and any(f.endswith(".tmp.nii.gz") for f in os.listdir(out)), poll=0.002)
    left = os.listdir(out)
    assert left and all(f.startswith(".") and f.endswith(".tmp.nii.gz") for f in left), left

    workflow = ConfigWorkflow(config_file=str(INFERENCE), workflow_type="infer", bundle_root=str(BUNDLE),
                              input=str(src), output_dir=str(out), ckpt_path=str(ckpt), device="cpu")  # fmt: skip
    workflow.initialize()
    workflow.run()
    assert sorted(os.listdir(out)) == sorted(f"case1_{t}.nii.gz" for t in TARGETS)
    assert all(nib.load(str(out / f)).shape == t2.shape for f in os.listdir(out))


# --- loading: weights only, clear errors -------------------------------------------------------------------------


class CodeOnLoad:
    """Pickles as a call to ``Path.touch(marker)``: loading it without ``weights_only`` creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _tiny_training(phantom_dir, out, variant="mgan", **extra):
    return run_workflow("train.json", run=False, dataset_dir=str(phantom_dir), output_dir=str(out), variant=variant,
                        **{**TINY, **extra})  # fmt: skip


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
        _tiny_training(phantom_dir, tmp_path / "run", "tcmgan", segmenter_ckpt=str(path)).parser.get_parsed_content(
            "seg_network"
        )
    else:
        target = tmp_path / "run" / "mgan" / "checkpoint.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        wf = _tiny_training(phantom_dir, tmp_path / "run", resume=True)
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


def _truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


@pytest.fixture
def checkpoints(phantom_dir, tmp_path):
    """A generator model.pt, a segmenter model.pt and a training checkpoint.pt of width 4, and truncated copies."""
    torch.manual_seed(0)
    files = {"generator": tmp_path / "g" / "model.pt", "segmenter": tmp_path / "s" / "model.pt"}
    for path in files.values():
        path.parent.mkdir()
    torch.save(SynthesisNet("tcmgan", 4).state_dict(), files["generator"])
    torch.save(TumourSegmenter(4).state_dict(), files["segmenter"])
    _save_training_checkpoint(_tiny_training(phantom_dir, tmp_path / "t"))
    files["training"] = tmp_path / "t" / "mgan" / "checkpoint.pt"
    files["truncated"] = _truncated(files["generator"], tmp_path / "truncated.pt")
    return files


WRONG_FILES = [
    # (entry, file given, the message says)
    ("inference ckpt_path", "segmenter", "is not a generator model.pt (SynthesisNet state dict, as training writes to "
     "<output_dir>/<variant>/model.pt): it holds a segmenter, features 4"),
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
    _save_training_checkpoint(_tiny_training(phantom_dir, tmp_path))
    wf = _tiny_training(phantom_dir, tmp_path, resume=True, features=8)
    with pytest.raises(Exception) as info:
        wf.run()
    error = root_cause(info.value)
    assert isinstance(error, ValueError)
    assert "another architecture" in str(error)
    assert "generator: checkpoint has generator variant 'mgan', features 4; this run has generator variant 'mgan', " \
           "features 8" in str(error)  # fmt: skip
    assert "critic: checkpoint has critic (with modality head), features 4" in str(error)


def test_inference_variant_override_that_contradicts_the_checkpoint_says_which(checkpoints):
    workflow = ConfigWorkflow(config_file=str(INFERENCE), workflow_type="infer", bundle_root=str(BUNDLE),
                              ckpt_path=str(checkpoints["generator"]), variant="mgan", device="cpu")  # fmt: skip
    workflow.initialize()
    with pytest.raises(Exception) as info:
        workflow.parser.get_parsed_content("network")
    assert "variant 'tcmgan' (the workflow asks 'mgan')" in str(root_cause(info.value))


def test_segmenter_training_checkpoint_is_accepted_as_segmenter_ckpt(tmp_path):
    torch.manual_seed(0)
    net = TumourSegmenter(4)
    save_atomic({"network": net.state_dict(), "trainer": {"iteration": 1}}, str(tmp_path / "checkpoint.pt"))
    loaded = load_segmenter(str(tmp_path / "checkpoint.pt"))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_checkpoint_with_weights_that_do_not_fit_its_arch_entry_is_reported_as_damaged(tmp_path):
    state = SynthesisNet("tcmgan", 4).state_dict()
    state["arch"] = torch.tensor([2, 8, 3, 7])  # claims width 8, holds width-4 tensors
    torch.save(state, tmp_path / "model.pt")
    assert synthesis_arch(str(tmp_path / "model.pt"))["features"] == 8
    from scripts.runtime.checkpoints import load_synthesis_weights

    with pytest.raises(ValueError, match="its weights do not fit the generator its 'arch' entry describes"):
        load_synthesis_weights(SynthesisNet("tcmgan", 8), str(tmp_path / "model.pt"))


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
        _truncated(t1, t1.with_suffix(".part")).replace(t1)
    elif how == "not an image":
        t1.write_text("not an image")
    elif how == "missing file":
        t1.unlink()
    elif how == "another grid":
        nib.save(nib.Nifti1Image(np.ones((40, 40, 20), np.float32), np.eye(4)), str(t1))
    elif how == "no brain slice":  # readable and well formed; found only when the volume is preprocessed
        t2 = data / entry["image"][3]
        img = nib.load(str(t2))
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.int16), img.affine), str(t2))
        return t2
    return t1


@pytest.fixture
def copied_data(phantom_dir, tmp_path) -> Path:
    return Path(shutil.copytree(phantom_dir, tmp_path / "data"))


@pytest.mark.parametrize("how", ["truncated gzip", "not an image", "missing file", "another grid", "no brain slice"])
def test_bad_case_fails_before_training_starts_naming_case_and_file(copied_data, tmp_path, how):
    bad = _damage(copied_data, how)
    case, _ = _gan_case(copied_data)
    wf = _tiny_training(copied_data, tmp_path / "out")
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
    wf = _tiny_training(copied_data, tmp_path / "out", skip_bad_cases=True)
    wf.run()
    volumes = wf.parser.get_parsed_content("train#volumes")
    assert volumes.skipped == [case] and len(volumes) == n_gan - 1
    logged = "".join(capfd.readouterr())  # the bundle's logging.conf prints warnings to the console
    assert f"WARNING - skipping case {case} (skip_bad_cases is set): case {case}: {bad}: corrupt or truncated" in logged
    assert wf.parser.get_parsed_content("train#trainer").state.iteration == TINY["epoch_length"]


def test_skip_bad_cases_also_skips_a_case_that_fails_in_preprocessing(copied_data, tmp_path):
    _damage(copied_data, "no brain slice")
    case, _ = _gan_case(copied_data)
    wf = _tiny_training(copied_data, tmp_path / "out", skip_bad_cases=True)
    volumes = wf.parser.get_parsed_content("train#volumes")
    assert volumes.skipped == [case]
    assert all(case not in str(item.get("case")) for item in volumes.data)


def test_header_check_decompresses_only_a_gzip_whose_trailer_disagrees(tmp_path, monkeypatch):
    """The cheap check compares the gzip trailer with the header's length: a complete file is not decompressed; a
    valid file whose trailer disagrees (two gzip members, as parallel compressors write) is read in full and
    accepted; a truncated uncompressed file is refused."""
    import gzip
    import types

    import scripts.runtime.data

    full_reads = []
    monkeypatch.setattr(scripts.runtime.data, "gzip", types.SimpleNamespace(open=lambda p, m: full_reads.append(p) or
                                                                      gzip.open(p, m)))  # fmt: skip
    check_case_files = scripts.runtime.data.check_case_files
    nib.save(nib.Nifti1Image(np.arange(4000, dtype=np.float32).reshape(20, 20, 10), np.eye(4)), str(tmp_path / "a.nii"))
    raw = (tmp_path / "a.nii").read_bytes()
    (tmp_path / "one.nii.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "two.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    check_case_files({"case": "c", "image": [str(tmp_path / "one.nii.gz")]}, keys=("image",))
    assert full_reads == []
    check_case_files({"case": "c", "image": [str(tmp_path / "two.nii.gz")]}, keys=("image",))
    assert full_reads == [str(tmp_path / "two.nii.gz")]
    assert np.asarray(nib.load(str(tmp_path / "two.nii.gz")).dataobj).sum() == np.arange(4000).sum()
    (tmp_path / "short.nii").write_bytes(raw[:-100])
    with pytest.raises(ValueError, match=r"^case c: .*short.nii: holds \d+ bytes; its header needs \d+ \(truncated\)"):
        check_case_files({"case": "c", "image": [str(tmp_path / "short.nii")]}, keys=("image",))

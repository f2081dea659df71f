"""Many volumes: reading ahead (Prefetcher), writing in the background (BackgroundWriter), sharding the cases over
``torchrun`` processes, and the bf16 CPU path (``precision``) of ``inference.json``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE, CONFIGS, REPO, brain, files_in, save_nifti
from monai.bundle import ConfigWorkflow

from scripts.runtime import inference, precision
from scripts.runtime.cases import inference_cases
from scripts.runtime.command_line import one_line
from scripts.runtime.networks import TARGETS
from scripts.runtime.throughput import BackgroundWriter, Prefetcher, process_shard, shard

SHIPPED = BUNDLE / "models" / "model.pt"


def synthesise(output_dir: Path, ckpt, **override) -> None:
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"), meta_file=str(CONFIGS / "metadata.json"), workflow_type="infer",
        bundle_root=str(BUNDLE), output_dir=str(output_dir), ckpt_path=str(ckpt), **override,
    )  # fmt: skip
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def case_folder(root: Path, n: int, shape=(32, 32, 10)) -> Path:
    """``n`` T2 volumes ``c<i>_t2.nii.gz`` and a datalist listing them in ``test``."""
    entries = []
    for i in range(n):
        save_nifti(root / f"c{i}_t2.nii.gz", brain(shape, seed=i))
        entries.append({"case": f"c{i}", "image": f"c{i}_t2.nii.gz"})
    (root / "datalist.json").write_text(json.dumps({"channels": ["t2"], "test": entries}))
    return root / "datalist.json"


# --- Prefetcher ---------------------------------------------------------------------------------------------------


def test_prefetcher_keeps_the_order_and_reads_ahead_in_another_thread():
    threads, produced = [], []

    def source():
        for i in range(5):
            threads.append(threading.current_thread())
            produced.append(i)
            yield i

    items, ahead = [], []
    for item in Prefetcher(source(), depth=1):
        time.sleep(0.05)  # the consumer is slower: meanwhile the producer makes the next items
        ahead.append(len(produced) - 1 - item)
        items.append(item)
    assert items == list(range(5))
    assert all(t is not threading.current_thread() for t in threads)
    assert max(ahead) >= 1  # an item was ready before the consumer asked for it


def test_prefetcher_raises_the_loading_error_itself_at_its_item():
    error = ValueError("c2.nii.gz: cannot be read")

    def source():
        yield 0
        yield 1
        raise error

    got = []
    with pytest.raises(ValueError) as info:
        for item in Prefetcher(source(), depth=2):
            got.append(item)
    assert info.value is error and got == [0, 1]


def test_prefetcher_stops_its_thread_when_the_consumer_leaves_early():
    produced = []

    def source():
        for i in range(1000):
            produced.append(i)
            yield i

    for item in Prefetcher(source(), depth=1):
        if item == 2:
            break
    before = len(produced)
    time.sleep(0.3)
    assert len(produced) == before < 10  # the producer stopped, a few items ahead at most
    assert not [t for t in threading.enumerate() if t.name == "brainsynth-prefetch"]


def test_prefetcher_depth_zero_runs_in_the_caller_and_has_the_loaders_length():
    threads = []

    def source():
        threads.append(threading.current_thread())
        yield 1

    assert list(Prefetcher(source(), depth=0)) == [1] and threads == [threading.current_thread()]
    assert len(Prefetcher([1, 2, 3])) == 3
    with pytest.raises(ValueError, match="depth"):
        Prefetcher([], depth=-1)


# --- BackgroundWriter ---------------------------------------------------------------------------------------------


def test_background_writer_runs_jobs_in_order_off_the_callers_thread():
    done, threads = [], []

    def job(i):
        time.sleep(0.01)
        threads.append(threading.current_thread())
        done.append(i)

    writer = BackgroundWriter(depth=2)
    for i in range(5):
        writer.submit(job, i)
    writer.flush()
    assert done == list(range(5)) and threading.current_thread() not in threads


def test_background_writer_raises_a_failed_job_at_the_next_submit_or_flush():
    def fail():
        raise OSError(28, "cannot write /out/c1_flair.nii.gz: No space left on device")

    writer = BackgroundWriter()
    writer.submit(fail)
    with pytest.raises(OSError, match="c1_flair"):
        writer.flush()
    writer.submit(fail)
    time.sleep(0.1)
    with pytest.raises(OSError, match="No space"):
        writer.submit(lambda: None)


def test_background_writer_wait_lets_jobs_finish_without_raising_and_disabled_runs_inline(caplog):
    done = []
    writer = BackgroundWriter()
    writer.submit(lambda: (time.sleep(0.1), done.append(1)))
    writer.submit(lambda: 1 / 0)
    writer.wait()
    assert done == [1] and "writing in the background also failed: division by zero" in caplog.text
    inline = BackgroundWriter(enabled=False)
    with pytest.raises(ZeroDivisionError):
        inline.submit(lambda: 1 / 0)


def test_background_and_direct_writing_give_the_same_files(tmp_path, tcmgan_ckpt):
    datalist = case_folder(tmp_path / "data", 3)
    synthesise(tmp_path / "bg", tcmgan_ckpt, datalist=str(datalist), background_write=True, prefetch=2)
    synthesise(tmp_path / "fg", tcmgan_ckpt, datalist=str(datalist), background_write=False, prefetch=0)
    assert files_in(tmp_path / "bg") == files_in(tmp_path / "fg") == sorted(
        f"c{i}_{t}.nii.gz" for i in range(3) for t in TARGETS
    )
    for name in files_in(tmp_path / "bg"):
        np.testing.assert_array_equal(nib.load(tmp_path / "bg" / name).get_fdata(),
                                      nib.load(tmp_path / "fg" / name).get_fdata())  # fmt: skip


def test_a_write_failing_in_the_background_stops_the_run_naming_the_output(tmp_path, tcmgan_ckpt, monkeypatch):
    datalist = case_folder(tmp_path / "data", 3)
    real_save = nib.save

    def full_disk_for_c1(img, path):
        if "c1_t1." in os.path.basename(str(path)):
            raise OSError(28, "No space left on device")
        real_save(img, path)

    monkeypatch.setattr(inference.nib, "save", full_disk_for_c1)
    with pytest.raises(Exception) as info:
        synthesise(tmp_path / "out", tcmgan_ckpt, datalist=str(datalist), background_write=True)
    line = one_line(info.value)  # what the command prints
    assert line.startswith(f"OSError: [Errno 28] cannot write {tmp_path / 'out' / 'c1_flair.nii.gz'}"), line
    written = files_in(tmp_path / "out")
    assert not [f for f in written if f.startswith(("c1_", "."))]  # nothing of c1, no temporary
    assert {f"c0_{t}.nii.gz" for t in TARGETS} <= set(written)


def test_a_loading_error_waits_for_the_earlier_cases_writes(tmp_path, tcmgan_ckpt, monkeypatch):
    """c0 is still being written (slowly) when c1 fails to load: the run stops with c1's error, and all of c0 is on
    disk by then, with no temporary left."""
    datalist = case_folder(tmp_path / "data", 2)
    (tmp_path / "data" / "c1_t2.nii.gz").write_bytes(b"not a nifti")
    real_save = nib.save

    def slow_save(img, path):
        time.sleep(0.5)
        real_save(img, path)

    monkeypatch.setattr(inference.nib, "save", slow_save)
    with pytest.raises(Exception) as info:
        synthesise(tmp_path / "out", tcmgan_ckpt, datalist=str(datalist), background_write=True, prefetch=1)
    assert one_line(info.value).startswith(f"ValueError: {tmp_path / 'data' / 'c1_t2.nii.gz'}: cannot be read")
    assert files_in(tmp_path / "out") == sorted(f"c0_{t}.nii.gz" for t in TARGETS)


# --- sharding -------------------------------------------------------------------------------------------------------


def test_shards_cover_every_case_exactly_once():
    cases = list(range(11))
    shards = [shard(cases, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == cases and all(shards)


def test_process_shard_reads_torchruns_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert process_shard() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert process_shard() == (1, 2)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2"):
        process_shard()


def test_each_rank_lists_its_share_taken_before_the_finished_cases_are_left_out(tmp_path, monkeypatch):
    datalist = case_folder(tmp_path / "data", 5)
    for t in TARGETS:  # c0 is done: rank 0's share shrinks, rank 1's stays
        (tmp_path / "out").mkdir(exist_ok=True)
        (tmp_path / "out" / f"c0_{t}.nii.gz").write_bytes(b"")
    monkeypatch.setenv("WORLD_SIZE", "2")
    lists = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        cases = inference_cases(datalist=str(datalist), output_dir=str(tmp_path / "out"), overwrite=False)
        lists.append([c["case"] for c in cases])
    assert lists == [["c2", "c4"], ["c1", "c3"]]


@pytest.mark.slow
@pytest.mark.parametrize("overlay", [False, True], ids=["inference.json", "with multi_gpu_inference.json"])
def test_torchrun_writes_each_case_once_by_one_rank_that_names_it(tmp_path, tcmgan_ckpt, overlay):
    datalist = case_folder(tmp_path / "data", 5)
    files = [str(CONFIGS / "inference.json")] + ([str(CONFIGS / "multi_gpu_inference.json")] if overlay else [])
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
            "run", "inference", "--bundle_root", "bundle", "--config_file", str(files) if overlay else files[0],
            "--dataset_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
            "--ckpt_path", str(tcmgan_ckpt)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert files_in(tmp_path / "out") == sorted(f"c{i}_{t}.nii.gz" for i in range(5) for t in TARGETS)
    lines = re.findall(r"rank (\d)/2 \[\d/\d\] (c\d): [\d.]+ s", res.stdout + res.stderr)
    by_case = {}
    for rank, case in lines:
        by_case.setdefault(case, []).append(rank)
    assert by_case == {f"c{i}": [str(i % 2)] for i in range(5)}  # each case once, by the rank that owns it
    assert datalist.exists()


def test_the_inference_overlay_alone_says_how_to_stack_it(tmp_path):
    args = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", "bundle",
            "--config_file", str(CONFIGS / "multi_gpu_inference.json")]  # fmt: skip
    res = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "multi_gpu_inference.json is an overlay of inference.json" in res.stderr.strip().splitlines()[-1]


# --- bf16 ---------------------------------------------------------------------------------------------------------


def test_precision_names_are_checked_and_bf16_without_native_support_warns(monkeypatch, caplog):
    with pytest.raises(ValueError, match="precision"):
        inference.SliceRunner(precision="fp16")
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    assert precision.resolve_precision("auto", "cuda") == "fp32"
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    monkeypatch.setattr(inference, "native_bf16", lambda: False)
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    runner = inference.SliceRunner(batch_size=4, precision="bf16")
    runner(torch.rand(2, 1, 8, 8), torch.nn.Conv2d(1, 3, 3, padding=1))
    assert "no native bfloat16" in caplog.text and runner.last_engine == "bf16"
    assert inference.SliceRunner().precision == "fp32"


def test_bf16_runner_returns_float32_and_uses_torch():
    net = torch.nn.Conv2d(1, 3, 3, padding=1)
    runner = inference.SliceRunner(batch_size=4, backend="auto", precision="bf16")
    out = runner(torch.rand(6, 1, 16, 16), net)
    assert out.dtype == torch.float32 and out.shape == (6, 3, 16, 16) and runner.last_engine == "bf16"


@pytest.mark.slow
def test_bf16_synthesis_of_the_shipped_model_stays_above_the_45_db_fidelity_bar(tmp_path, phantom_dir):
    t2 = sorted(phantom_dir.glob("*/*_t2.nii.gz"))[0]
    for precision in ("fp32", "bf16"):
        synthesise(tmp_path / precision, SHIPPED, input=str(t2), precision=precision)
    mask = nib.load(t2).get_fdata() > 0
    for name in files_in(tmp_path / "fp32"):
        a = nib.load(tmp_path / "fp32" / name).get_fdata()[mask]
        b = nib.load(tmp_path / "bf16" / name).get_fdata()[mask]
        psnr = 10 * np.log10(1.0 / np.mean((a - b) ** 2))  # outputs are in [0, 1]
        assert 45 <= psnr < 200, f"{name}: bf16 differs from fp32 by PSNR {psnr:.1f} dB"

"""Specification of the speed and memory benchmark, tools/benchmark.py: what each of its measurements
compares, run on tiny settings.

Speed itself is measured by the benchmark (``bundle/docs/performance.md``), never asserted here. What it compares is
specified elsewhere: the brain-slice inferer and its engines in ``test_inference.py``, the volume cache in
``test_data.py``, the loss functions the benchmark's plain loop and the trainer both call in ``test_losses.py``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import SMALL_MIN_PIXELS, save_nifti

import benchmark


def test_inference_benchmark_times_the_workflow_against_the_same_slices(tmp_path):
    torch.manual_seed(0)
    ckpt = benchmark.random_generator_ckpt(str(tmp_path / "model.pt"), features=4)
    t2 = np.zeros((48, 40, 20), np.float32)
    t2[8:40, 8:32, 3:17] = 300 + 100 * np.random.default_rng(0).random((32, 24, 14))  # brain on 14 of 20 slices
    save_nifti(tmp_path / "c_t2.nii.gz", t2)
    row = benchmark.time_inference(str(tmp_path / "c_t2.nii.gz"), ckpt, "cpu", repeats=1, sw_batch_size=8)
    assert row["slices"] == 20 and row["slices_run"] == "15 / 20"  # the bare forward runs the same 14 + 1 slices
    assert row["features"] == 4 and row["workflow_s"] > row["network_s"] > 0
    assert row["workflow_over_bare"] == pytest.approx(row["workflow_s"] / row["bare_same_s"])
    assert row["backend"] == "onnxruntime"  # the CPU default; its bare forward is the same session
    row = benchmark.time_inference(str(tmp_path / "c_t2.nii.gz"), ckpt, "cpu", repeats=1, backend="torch")
    assert row["backend"] == "torch" and row["slices_run"] == "15 / 20"
    row = benchmark.time_inference(str(tmp_path / "c_t2.nii.gz"), ckpt, "cpu", repeats=1, precision="bf16")
    assert row["precision"] == "bf16" and row["backend"] == "torch"  # bf16 runs with torch autocast


def test_throughput_benchmark_compares_both_pipelines_and_precisions_with_the_io_floor(phantom_dir, tmp_path):
    result = benchmark.throughput(dataset_dir=str(phantom_dir), widths="4", device="cpu", precision="fp32,bf16",
                                  repeats=1, output=str(tmp_path / "t.json"))  # fmt: skip
    floor, *rows = result["rows"]
    assert floor["mode"].startswith("I/O floor") and floor["volumes_per_min"] > 0
    assert [(r["precision"], r["mode"]) for r in rows] == [
        (p, m) for p in ("fp32", "bf16") for m in ("one case after another", "read ahead + background write")
    ]
    assert all(r["cases"] == floor["cases"] > 0 and r["volumes_per_min"] > 0 for r in rows)
    assert all(r["of_floor"] == pytest.approx(floor["s_per_volume"] / r["s_per_volume"]) for r in rows)
    assert [r["engine"] for r in rows] == ["onnxruntime", "onnxruntime", "bf16", "bf16"]
    assert "psnr_min" not in rows[0] and all(20 < r["psnr_min"] <= r["psnr_mean"] for r in rows[2:])
    assert json.loads((tmp_path / "t.json").read_text())["benchmark"] == "throughput"


def test_training_benchmark_compares_trainer_and_plain_loop_on_the_same_batches(phantom_dir):
    row = benchmark.time_training(str(phantom_dir), "mgan", features=4, batch_size=8, iterations=2, repeats=1,
                                  device="cpu", min_brain_pixels=SMALL_MIN_PIXELS, val_num_cases=1)  # fmt: skip
    assert row["blocks"] == "1 x 2"
    assert row["trainer_it_per_s"] > 0 and row["plain_it_per_s"] > 0 and row["trainer_over_plain"] > 0


def test_training_benchmark_refuses_a_batch_larger_than_the_data(phantom_dir):
    with pytest.raises(ValueError, match="fewer than one batch of 512"):
        benchmark.time_training(str(phantom_dir), "mgan", features=4, batch_size=512, iterations=1, repeats=1,
                                device="cpu", min_brain_pixels=SMALL_MIN_PIXELS, val_num_cases=1)  # fmt: skip


def test_memory_probe_caches_every_listed_case(phantom_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    datalist = benchmark.replicated_datalist(str(data), 3)
    assert [c["case"] for c in json.loads(open(datalist).read())["gan"]] == ["copy0000", "copy0001", "copy0002"]
    row = benchmark.memory_probe(datalist, str(tmp_path / "cache"), True, min_brain_pixels=SMALL_MIN_PIXELS)
    assert row["cases"] == 3 and row["slices"] > 0 and row["cache"] == "disk (cache_dir)"
    assert len(list((tmp_path / "cache").iterdir())) == 2 * 3  # one image and one label file per listed case


def test_the_flop_count_of_a_gan_iteration_grows_with_the_batch(phantom_dir, tmp_path):
    """``benchmark.py precision`` divides this count by the iteration time: it must cover the whole iteration
    (forward, backward and the gradient penalty's double backward), so it doubles with the batch."""
    counts = []
    for batch in (2, 4):
        wf = benchmark.training_workflow(str(phantom_dir), str(tmp_path / str(batch)), "tcmgan", features=4,
                                         batch_size=batch, epoch_length=1, min_brain_pixels=SMALL_MIN_PIXELS)
        counts.append(benchmark.iteration_gflop(wf.parser.get_parsed_content("train#trainer")))
    assert counts[0] > 0 and counts[1] == pytest.approx(2 * counts[0], rel=0.02)


def test_the_matmul_rate_is_measured_in_the_format_asked():
    assert benchmark.matmul_rate(torch.float32, size=64, seconds=0.05) > 0
    assert benchmark.matmul_rate(torch.bfloat16, size=64, seconds=0.05) > 0

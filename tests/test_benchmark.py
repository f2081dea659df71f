"""The speed and memory work keeps the results: the brain-slice inferer equals MONAI's ``SliceInferer``, the disk
cache gives the same slices as the memory cache without holding them. (The benchmark's plain loop and the trainer
call the same loss functions, specified in ``test_losses.py``.)

Speed itself is measured by ``bundle/scripts/benchmark.py`` (``bundle/docs/performance.md``), never asserted here;
the benchmark's functions are only run on tiny settings to check what they compare.
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SMALL_MIN_PIXELS, TINY, run_workflow
from monai.data import MetaTensor
from monai.inferers import SliceInferer
from torch import nn

from scripts import benchmark
from scripts.runtime.data import VolumeCache
from scripts.runtime import inference
from scripts.runtime.inference import BrainSliceInferer
from scripts.runtime.networks import SynthesisNet


class CountingNet(nn.Module):
    """Wraps a network and counts the slices it is given."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.slices, self.calls = net, 0, []

    def forward(self, x):
        self.slices += x.shape[0]
        self.calls.append(x.shape[0])
        return self.net(x)


def volume_with_empty_slices(depth=12, empty=(0, 1, 7, 11), seed=0) -> torch.Tensor:
    """``(1, 1, 128, 128, depth)`` in [-1, 1]; the slices in ``empty`` are all background (-1)."""
    g = torch.Generator().manual_seed(seed)
    vol = torch.rand(1, 1, 128, 128, depth, generator=g) * 2 - 1
    vol[..., list(empty)] = -1.0
    return vol


def test_brain_slice_inferer_equals_slice_inferer_and_runs_only_brain_slices():
    torch.manual_seed(0)
    net = SynthesisNet("tcmgan", features=4).eval()
    vol = volume_with_empty_slices()
    with torch.no_grad():
        expected = SliceInferer(roi_size=(128, 128), spatial_dim=2, sw_batch_size=5)(vol, net)
        counting = CountingNet(net)
        got = BrainSliceInferer(sw_batch_size=5)(MetaTensor(vol), counting)
    assert got.shape == (1, 3, 128, 128, 12) and isinstance(got, MetaTensor)
    torch.testing.assert_close(got.as_tensor(), torch.as_tensor(expected), atol=1e-5, rtol=0)
    assert counting.slices == 8 + 1  # 8 brain slices and one all-background slice for the 4 empty ones
    assert counting.calls == [5, 4]  # 9 slices in ceil(9 / 5) = 2 batches as equal as can be


def test_brain_slice_inferer_on_a_volume_without_brain_runs_one_slice():
    torch.manual_seed(0)
    net = CountingNet(SynthesisNet("mgan", features=4).eval())
    vol = -torch.ones(1, 1, 128, 128, 6)
    with torch.no_grad():
        got = BrainSliceInferer(sw_batch_size=64)(vol, net)
        one = net.net(-torch.ones(1, 1, 128, 128))
    assert net.slices == 1  # one all-background slice stands for all six
    torch.testing.assert_close(got, one[..., None].expand(-1, -1, -1, -1, 6), atol=1e-6, rtol=0)


def test_brain_slice_inferer_under_autocast_returns_the_input_dtype():
    """``inference.json --amp true`` runs the inferer under autocast: the network answers in half precision and the
    volume keeps float32 (on a GPU float16; bfloat16 on the CPU here, the same code path)."""
    torch.manual_seed(0)
    net = SynthesisNet("tcmgan", features=4).eval()
    vol = volume_with_empty_slices(depth=6, empty=(0, 5))
    with torch.no_grad():
        full = BrainSliceInferer(sw_batch_size=4)(vol, net)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert net(vol[..., 1]).dtype == torch.bfloat16
            got = BrainSliceInferer(sw_batch_size=4)(vol, net)
    assert got.dtype == torch.float32 and got.shape == full.shape
    torch.testing.assert_close(got, full, atol=0.1, rtol=0)  # bfloat16 keeps ~3 significant digits


@pytest.mark.parametrize("variant", ["tcmgan", "pix2pix"])
def test_onnxruntime_backend_equals_torch_for_any_number_of_slices(variant):
    """One export (dynamic batch size) serves volumes with other numbers of brain slices, with torch's outputs."""
    torch.manual_seed(0)
    net = SynthesisNet(variant, features=4).eval()
    inferer = BrainSliceInferer(sw_batch_size=4, backend="onnxruntime")
    for depth, empty in ((10, (0, 9)), (7, ())):  # batches of 3, 3, 3 then 4, 3
        vol = volume_with_empty_slices(depth=depth, empty=empty)
        with torch.no_grad():
            expected = BrainSliceInferer(sw_batch_size=4)(vol, net)
        got = inferer(vol, net)
        assert inferer.runner.last_engine == "onnxruntime" and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert inferer.runner.exports == 1  # one export for both depths


def test_onnxruntime_backend_follows_new_weights():
    """The exported model is rebuilt when the network changes: another network or weights loaded in place."""
    torch.manual_seed(0)
    net, other = SynthesisNet("mgan", features=4).eval(), SynthesisNet("mgan", features=4).eval()
    vol = volume_with_empty_slices(depth=4, empty=())
    inferer = BrainSliceInferer(backend="onnxruntime")
    inferer(vol, net)
    session = inferer.runner.session
    inferer(vol, net)
    assert inferer.runner.session is session  # same weights: no new export
    net.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(inferer(vol, net), BrainSliceInferer()(vol, other), atol=1e-5, rtol=0)
    assert inferer.runner.session is not session


def test_auto_backend_uses_onnxruntime_on_the_cpu_only_when_installed(monkeypatch):
    net = SynthesisNet("mgan", features=4).eval()
    vol = volume_with_empty_slices(depth=3, empty=())
    auto = BrainSliceInferer(backend="auto")
    auto(vol, net)
    assert auto.runner.last_engine == "onnxruntime"
    monkeypatch.setattr(inference, "onnxruntime_available", lambda: False)
    missing = BrainSliceInferer(backend="auto")
    missing(vol, net)
    assert missing.runner.last_engine == "eager" and missing.runner.session is None
    with pytest.raises(ImportError, match="backend 'onnxruntime' needs the onnx and onnxruntime packages"):
        BrainSliceInferer(backend="onnxruntime")(vol, net)
    with pytest.raises(ValueError, match="backend must be one of"):
        BrainSliceInferer(backend="onnx")
    assert inference.resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match="backend 'onnxruntime' runs on the CPU, but the slices are on cuda"):
        inference.resolve_backend("onnxruntime", "cuda")


def test_onnxruntime_backend_falls_back_to_torch_when_the_export_fails(monkeypatch, caplog):
    def broken_export(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    net = SynthesisNet("mgan", features=4).eval()
    vol = volume_with_empty_slices(depth=3, empty=())
    inferer = BrainSliceInferer(backend="auto")
    with caplog.at_level("WARNING"):
        got = inferer(vol, net)
    with torch.no_grad():
        torch.testing.assert_close(got, BrainSliceInferer()(vol, net))
    assert "ONNX Runtime path failed (RuntimeError: unsupported operator); running with torch" in caplog.text
    assert inferer.backend == "torch" and inferer.runner.session is None


class PerSampleNet(nn.Module):
    """A small per-sample (N, 1, H, W) -> (N, 3, H, W) network: compiles in seconds."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.InstanceNorm2d(3)

    def forward(self, x):
        return torch.tanh(self.norm(self.conv(x)))


def test_compiled_inferer_gives_the_same_output_for_any_number_of_brain_slices():
    torch.manual_seed(0)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    net = PerSampleNet().eval()
    inferer = BrainSliceInferer(sw_batch_size=4, compile=True)
    for depth, empty in ((10, (0, 9)), (7, ())):  # batches of 3, 3, 3 then 4, 3: one compiled graph for all
        vol = volume_with_empty_slices(depth=depth, empty=empty)
        with torch.no_grad():
            eager = BrainSliceInferer(sw_batch_size=4)(vol, net)
            got = inferer(vol, net)
        torch.testing.assert_close(got, eager, atol=1e-5, rtol=0)
    assert inferer.runner.last_engine == "compiled"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # no recompilation for other batch sizes


def test_inferer_falls_back_to_eager_when_compiling_fails(monkeypatch, caplog):
    def broken_compile(network, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    net = PerSampleNet().eval()
    vol = volume_with_empty_slices(depth=6, empty=(0,))
    inferer = BrainSliceInferer(sw_batch_size=4, compile=True)
    with caplog.at_level("WARNING"):
        got = inferer(vol, net)
    torch.testing.assert_close(got, BrainSliceInferer(sw_batch_size=4)(vol, net))
    assert "torch.compile failed (RuntimeError: no C++ compiler found); running eagerly" in caplog.text
    assert inferer.compile is False


def test_inference_compiles_only_for_many_volumes(phantom_dir):
    wf = run_workflow("inference.json", workflow_type="inference", run=False, dataset_dir=str(phantom_dir))
    assert wf.parser.get_parsed_content("compile") is False  # 2 test cases: eager
    assert wf.parser.get_parsed_content("inferer").compile is False


# --- the volume cache on disk ------------------------------------------------------------------------------------


def _volumes(phantom_dir, out, **override):
    wf = run_workflow("train.json", run=False, dataset_dir=str(phantom_dir), output_dir=str(out), variant="mgan",
                      **{**TINY, **override})  # fmt: skip
    return wf.parser.get_parsed_content("train#volumes"), wf.parser.get_parsed_content("train#dataset")


def test_disk_cache_gives_the_same_slices_as_the_memory_cache_and_holds_none(phantom_dir, tmp_path):
    memory, memory_slices = _volumes(phantom_dir, tmp_path / "a")
    disk, disk_slices = _volumes(phantom_dir, tmp_path / "b", cache_dir=str(tmp_path / "cache"))
    assert isinstance(disk, VolumeCache) and len(disk) == len(memory) and len(disk_slices) == len(memory_slices)
    for i in range(len(disk)):
        for key in ("image", "label"):
            assert isinstance(disk[i][key], np.memmap)  # file-backed: the process holds no copy
            np.testing.assert_array_equal(np.asarray(disk[i][key]), memory[i][key].numpy())
    for i in (0, len(disk_slices) // 2, len(disk_slices) - 1):
        for key in ("image", "label"):
            torch.testing.assert_close(disk_slices[i][key], memory_slices[i][key], atol=0, rtol=0)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 2 * len(disk) and all(f.endswith((".image.npy", ".label.npy")) for f in files)


def test_disk_cache_is_reused_without_reading_the_sources_and_not_across_preprocessing(phantom_dir, tmp_path,
                                                                                      monkeypatch):  # fmt: skip
    cache = tmp_path / "cache"
    _volumes(phantom_dir, tmp_path / "a", cache_dir=str(cache))
    first = sorted(p.name for p in cache.iterdir())
    loads = []
    real = nib.load
    monkeypatch.setattr(nib, "load", lambda *a, **k: loads.append(a[0]) or real(*a, **k))  # MONAI's reader too
    again, _ = _volumes(phantom_dir, tmp_path / "b", cache_dir=str(cache))
    assert sorted(p.name for p in cache.iterdir()) == first
    decoded = [f for f in loads if "datalist" not in str(f)]
    # only the cheap header checks open the sources (nibabel reads no voxel data for them)
    assert all(isinstance(again[i]["image"], np.memmap) for i in range(len(again)))
    assert len(decoded) == sum(len(c["image"]) + 1 for c in again.data)  # one header read per file, no decoding
    _volumes(phantom_dir, tmp_path / "c", cache_dir=str(cache), min_brain_pixels=SMALL_MIN_PIXELS + 100)
    assert len(list(cache.iterdir())) == 2 * len(first)  # other preprocessing: new files, the old ones untouched


# --- the benchmark's measurements, on tiny settings ---------------------------------------------------------------


def test_inference_benchmark_times_the_workflow_against_the_same_slices(tmp_path):
    torch.manual_seed(0)
    ckpt = benchmark.random_generator_ckpt(str(tmp_path / "model.pt"), features=4)
    t2 = np.zeros((48, 40, 20), np.float32)
    t2[8:40, 8:32, 3:17] = 300 + 100 * np.random.default_rng(0).random((32, 24, 14))  # brain on 14 of 20 slices
    nib.save(nib.Nifti1Image(t2, np.eye(4)), str(tmp_path / "c_t2.nii.gz"))
    row = benchmark.time_inference(str(tmp_path / "c_t2.nii.gz"), ckpt, "cpu", repeats=1, sw_batch_size=8)
    assert row["slices"] == 20 and row["slices_run"] == "15 / 20"  # the bare forward runs the same 14 + 1 slices
    assert row["features"] == 4 and row["workflow_s"] > row["network_s"] > 0
    assert row["workflow_over_bare"] == pytest.approx(row["workflow_s"] / row["bare_same_s"])
    assert row["backend"] == "onnxruntime"  # the CPU default; its bare forward is the same session
    row = benchmark.time_inference(str(tmp_path / "c_t2.nii.gz"), ckpt, "cpu", repeats=1, backend="torch")
    assert row["backend"] == "torch" and row["slices_run"] == "15 / 20"


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

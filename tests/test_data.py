"""Specification of the data pipeline, bundle/scripts/runtime/data.py: the datalist reader's error, the cheap
header check of every case file, the NIfTI reader shared by the cache's threads, and the volume cache (``VolumeCache``) in memory or memory-mapped from disk.

(A bad case named before training starts, or skipped with ``skip_bad_cases``, is specified with the other
reliability behaviour in ``test_reliability.py``.)
"""

from __future__ import annotations

import gzip
import json
import threading
import types

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SMALL_MIN_PIXELS, TINY, error_chain, run_workflow, save_nifti, train_workflow

import scripts.runtime.data
from scripts.runtime.data import ThreadSafeNibabelReader, VolumeCache


# --- the reader the cache's threads share ------------------------------------------------------------------------


def test_a_reader_shared_by_threads_keeps_each_threads_files(tmp_path):
    """MONAI's NibabelReader pairs get_data's images with the names of the *last* read() on the reader: on an H200
    machine (16 cache threads, no itk), 4-modality cases came out with one channel. Here one thread reads four
    files, another reads one in between, and the first still gets its four channels."""
    four = [tmp_path / f"m{i}.nii.gz" for i in range(4)]
    for i, path in enumerate(four):
        nib.save(nib.Nifti1Image(np.full((4, 5, 3), i, np.float32), np.eye(4)), str(path))
    one = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 3), np.uint8), np.eye(4)), str(one))
    reader = ThreadSafeNibabelReader()
    read_four, read_one, shapes = threading.Event(), threading.Event(), {}

    def first():
        images = reader.read([str(p) for p in four])
        read_four.set()
        read_one.wait(10)
        shapes["four"] = reader.get_data(images)[0].shape

    def second():
        read_four.wait(10)
        shapes["one"] = reader.get_data(reader.read(str(one)))[0].shape
        read_one.set()

    threads = [threading.Thread(target=f) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert shapes == {"four": (4, 4, 5, 3), "one": (4, 5, 3)}


def test_training_loads_its_volumes_through_the_thread_safe_reader():
    with open(scripts.runtime.data.__file__.replace("scripts/runtime/data.py", "configs/train.json")) as f:
        load = json.load(f)["load_transforms"][0]
    assert load["_target_"] == "LoadImaged"
    assert load["reader"] == {"_target_": "scripts.runtime.data.ThreadSafeNibabelReader"}


# --- the datalist ------------------------------------------------------------------------------------------------


def test_missing_datalist_says_how_to_make_data(tmp_path):
    with pytest.raises(Exception) as err:
        run_workflow("train.json", dataset_dir=str(tmp_path / "nothing"), output_dir=str(tmp_path),
                     **{**TINY, "variant": "mgan"})  # fmt: skip (tcmgan would stop first: no segmenter)
    assert "phantom.py" in "".join(str(e) for e in error_chain(err.value))


# --- the header check of a case's files --------------------------------------------------------------------------


def test_header_check_decompresses_only_a_gzip_whose_trailer_disagrees(tmp_path, monkeypatch):
    """The cheap check compares the gzip trailer with the header's length: a complete file is not decompressed; a
    valid file whose trailer disagrees (two gzip members, as parallel compressors write) is read in full and
    accepted; a truncated uncompressed file is refused."""
    full_reads = []
    monkeypatch.setattr(scripts.runtime.data, "gzip", types.SimpleNamespace(open=lambda p, m: full_reads.append(p) or
                                                                      gzip.open(p, m)))  # fmt: skip
    check_case_files = scripts.runtime.data.check_case_files
    save_nifti(tmp_path / "a.nii", np.arange(4000, dtype=np.float32).reshape(20, 20, 10))
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


# --- the volume cache on disk ------------------------------------------------------------------------------------


def _volumes(phantom_dir, out, **override):
    wf = train_workflow(phantom_dir, out, **override)
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

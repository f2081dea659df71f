"""Specification of the T2 contrast check (bundle/scripts/runtime/contrast.py, on by default in ``inference.json``):
on each modality of phantom cases it was not fitted on, of all three domains, every T2 is accepted and every T1,
T1ce and FLAIR refused, with one error naming the file; ``--check_contrast false`` lets any volume through."""

from __future__ import annotations

import inspect
import json
import logging

import numpy as np
import pytest
from conftest import REPO, save_nifti

from scripts import brainsynth, phantom
from scripts.runtime.contrast import t2_features, t2_probability
from scripts.runtime.inference import LoadVolumed

# seeds the classifier was not fitted on (tools/fit_contrast.py: cases of seed 0 to fit, of seed 1000 to measure)
CASES = [(phantom.case_seed(7, i, domain), domain) for i, domain in
         enumerate(["randomised", "randomised", "fixed", "shifted", "shifted"])]  # fmt: skip


@pytest.fixture(scope="module")
def cases():
    return [phantom.make_case(seed, domain=domain) for seed, domain in CASES]


def test_every_t2_is_accepted_and_every_other_modality_refused(cases):
    for case, (seed, domain) in zip(cases, CASES):
        p = {m: t2_probability(case[m]) for m in phantom.MODALITIES}
        assert p["t2"] > 0.5, (domain, seed, p)
        assert all(p[m] < 0.5 for m in ("t1", "t1ce", "flair")), (domain, seed, p)


def test_load_t2d_refuses_a_t1_given_as_the_t2_unless_the_check_is_off(cases, tmp_path):
    t1 = save_nifti(tmp_path / "case_t1.nii.gz", np.rint(cases[0]["t1"]).astype(np.int16))
    t2 = save_nifti(tmp_path / "case_t2.nii.gz", np.rint(cases[0]["t2"]).astype(np.int16))
    with pytest.raises(ValueError, match=r"case_t1.nii.gz: does not look like a T2 \(T2 probability 0\.\d\d: its CSF "
                                         r"is not bright; a T1, T1ce or FLAIR\?\); give --check_contrast false"):
        LoadVolumed(check_contrast=True)({"image": str(t1)})
    assert LoadVolumed(check_contrast=True)({"image": str(t2)})["image"].shape == (240, 240, 155)
    assert LoadVolumed(check_contrast=False)({"image": str(t1)})["image"].shape == (240, 240, 155)


def test_inference_checks_the_contrast_by_default():
    with open(REPO / "bundle" / "configs" / "inference.json") as f:
        assert json.load(f)["check_contrast"] is True
    assert inspect.signature(brainsynth.synthesise).parameters["check_contrast"].default is True


def test_a_volume_too_small_to_judge_is_let_through_with_a_warning(tmp_path, caplog):
    volume = np.zeros((40, 40, 40), np.int16)
    volume[14:26, 14:26, 14:26] = 100 + np.arange(12, dtype=np.int16)  # 216 brain voxels at half resolution
    path = save_nifti(tmp_path / "tiny_t2.nii.gz", volume)
    with caplog.at_level(logging.WARNING):
        assert LoadVolumed(check_contrast=True)({"image": str(path)})["image"].shape == (40, 40, 40)
    assert "tiny_t2.nii.gz: contrast not checked (too little brain to judge its contrast)" in caplog.text


def test_too_little_brain_is_said_so():
    volume = np.zeros((40, 40, 40), np.float32)
    volume[18:22, 18:22, 18:22] = 100
    with pytest.raises(ValueError, match="too little brain"):
        t2_features(volume)

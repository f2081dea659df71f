"""Specification of the T2 contrast check (bundle/scripts/runtime/contrast.py, ``--check_contrast true``): on each
modality of phantom cases it was not fitted on, of all three domains, every T2 is accepted and every T1, T1ce and
FLAIR refused, with one error naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import save_nifti

from scripts import phantom
from scripts.runtime.contrast import t2_features, t2_probability
from scripts.runtime.inference import LoadT2d

# seeds the classifier was not fitted on (it saw cases 0-23 of seed 0 and 0-7 of seed 0, shifted), all domains
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


def test_load_t2d_refuses_a_t1_given_as_the_t2_only_when_asked(cases, tmp_path):
    t1 = save_nifti(tmp_path / "case_t1.nii.gz", np.rint(cases[0]["t1"]).astype(np.int16))
    t2 = save_nifti(tmp_path / "case_t2.nii.gz", np.rint(cases[0]["t2"]).astype(np.int16))
    with pytest.raises(ValueError, match=r"case_t1.nii.gz: does not look like a T2 \(T2 probability 0\.\d\d: its CSF "
                                         r"is not bright; a T1, T1ce or FLAIR\?\); give --check_contrast false"):
        LoadT2d(check_contrast=True)({"image": str(t1)})
    assert LoadT2d(check_contrast=True)({"image": str(t2)})["image"].shape == (240, 240, 155)
    assert LoadT2d()({"image": str(t1)})["image"].shape == (240, 240, 155)  # off by default


def test_too_little_brain_is_said_so():
    volume = np.zeros((40, 40, 40), np.float32)
    volume[18:22, 18:22, 18:22] = 100
    with pytest.raises(ValueError, match="too little brain"):
        t2_features(volume)

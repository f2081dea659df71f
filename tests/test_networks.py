"""Specification of the networks, bundle/scripts/runtime/networks.py: the generator (``SynthesisNet``) and critic
(``ModalityCritic``) sizes of the reference code, the conditional forward, the critic's modality head, and the
one-target generator MONAI Label serves (``SingleTargetSynthesisNet``).

(How the generator describes its input preparation in its state dict is specified here; how a ``model.pt`` is
loaded, in ``test_checkpoints.py`` and ``test_configs.py``; the training iteration that uses these networks in ``test_training.py``.)
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, run_workflow

from scripts.runtime.losses import modality_classification_loss
from scripts.runtime.networks import (
    TARGETS,
    ModalityCritic,
    SingleTargetSynthesisNet,
    SynthesisNet,
    decode_description,
    encode_description,
)


def test_generator_matches_pix2pix_unet128():
    g = SynthesisNet("tcmgan", features=64)
    assert sum(p.numel() for p in g.parameters()) == 41_822_593  # the reference unet_128 with 4 input channels
    d = ModalityCritic(features=64)
    assert sum(p.numel() for p in d.parameters()) == 11_203_520  # the reference StarGAN critic, repeat_num 5
    x = torch.rand(2, 1, 128, 128) * 2 - 1
    out = SynthesisNet("tcmgan", features=4)(x)
    assert out.shape == (2, 3, 128, 128) and out.abs().max() <= 1


def test_conditional_forward_equals_per_label_synthesis():
    g = SynthesisNet("mgan", features=4).eval()
    x = torch.rand(2, 1, 128, 128) * 2 - 1
    all_targets = g(x)
    for k in range(3):
        torch.testing.assert_close(all_targets[:, k : k + 1], g.synthesise(x, torch.full((2,), k)))


@pytest.mark.parametrize("variant", ["pix2pix", "tcmgan"])
def test_some_targets_in_the_order_asked_and_the_scripted_generator_writes_all(variant):
    """``outputs`` picks channels by name or index in the order asked (one code path with the all-targets
    forward), and TorchScript (the zoo's export) compiles that forward to the same numbers."""
    g = SynthesisNet(variant, features=4, num_downs=3, image_size=32).eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        all_targets = g(x)
        torch.testing.assert_close(g(x, outputs=["t1ce", "flair"]), all_targets[:, [2, 0]])
        torch.testing.assert_close(g(x, outputs=[1]), all_targets[:, [1]])
        torch.testing.assert_close(torch.jit.script(g)(x), all_targets)
    with pytest.raises(ValueError, match="cannot synthesise 't2'"):
        g(x, outputs=["t2"])


def test_cls_head_learns_the_modality_on_real_pairs(phantom_dir):
    """The critic's classification head, trained on real (T2, target) pairs only, tells the targets apart."""
    wf = run_workflow("train.json", run=False, dataset_dir=str(phantom_dir), variant="mgan", **TINY)
    data = wf.parser.get_parsed_content("train#dataset")
    images = torch.stack([data[i]["image"] for i in range(0, len(data), max(1, len(data) // 48))])
    torch.manual_seed(0)
    critic = ModalityCritic(features=8, num_classes=3)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3)

    def pairs(imgs):
        k = torch.arange(len(imgs)) % 3
        return imgs[:, -1:], imgs[torch.arange(len(imgs)), k].unsqueeze(1), k

    train, held_out = pairs(images[::2]), pairs(images[1::2])
    for _ in range(200):
        opt.zero_grad()
        modality_classification_loss(critic(*train[:2])[1], train[2]).backward()
        opt.step()
    with torch.no_grad():
        accuracy = (critic(*held_out[:2])[1].argmax(1) == held_out[2]).float().mean().item()
    assert accuracy > 0.9


def test_single_target_net_is_the_generator_with_one_output():
    x = torch.rand(2, 1, 128, 128) * 2 - 1
    for variant in ("tcmgan", "pix2pix"):
        full = SynthesisNet(variant, features=4).eval()
        with torch.no_grad():
            expected = full(x)
        for k, target in enumerate(TARGETS):
            single = SingleTargetSynthesisNet(variant, features=4, target=target.upper()).eval()
            assert single.state_dict().keys() == full.state_dict().keys()
            single.load_state_dict(full.state_dict())
            with torch.no_grad():
                torch.testing.assert_close(single(x), expected[:, k : k + 1])
    with pytest.raises(ValueError, match="unknown target"):
        SingleTargetSynthesisNet(target="t2")


def test_the_state_dict_describes_the_input_preparation():
    """``_extra_state`` is an integer tensor (ONNX export, TorchScript and DDP walk state dicts and accept only
    tensors) that decodes to the settings the network was built with; loading refuses other settings."""
    net = SynthesisNet("mgan", features=4, image_size=64, intensity_scaling="slice")
    state = net.state_dict()
    assert state["_extra_state"].dtype == torch.int64
    assert decode_description(state["_extra_state"]) == {
        "image_size": 64, "intensity_scaling": "slice", "in_channels": 1, "upsample": "transpose",
        "targets": ["flair", "t1", "t1ce"],
    }  # fmt: skip
    SynthesisNet("mgan", features=4, image_size=64, intensity_scaling="slice").load_state_dict(state)
    with pytest.raises(ValueError, match=r"intensity_scaling 'slice' \(this network: 'volume'\)"):
        SynthesisNet("mgan", features=4, image_size=64).load_state_dict(state)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.tensor([3, 128, 0, 1, 0, 0]), "version 2"),  # another layout version
        (torch.tensor([2, 128, 0, 1, 0, 3, 0, 1]), "version 2"),  # fewer targets than it says
        (torch.tensor([1, 128, 0, 1, 3, 0, 1]), "version 2"),  # the same in the version-1 layout
        (torch.tensor([2, 128, 5, 1, 0, 0]), "out of range"),  # no such intensity scaling
        (torch.tensor([2, 128, 0, 1, 7, 0]), "out of range"),  # no such upsampling
        ({"image_size": 128}, "version 2"),  # not a tensor
    ],
)
def test_a_foreign_description_is_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        decode_description(bad)


def test_a_version_1_description_reads_as_transposed_convolutions():
    """Checkpoints written before ``upsample`` existed (the shipped model's first save) still load."""
    assert decode_description(torch.tensor([1, 128, 0, 1, 3, 0, 1, 2])) == {
        "image_size": 128, "intensity_scaling": "volume", "in_channels": 1, "upsample": "transpose",
        "targets": ["flair", "t1", "t1ce"],
    }  # fmt: skip


def test_description_round_trips_and_refuses_unknown_names():
    d = {"image_size": 96, "intensity_scaling": "volume", "in_channels": 3, "upsample": "resize",
         "targets": ["t1ce", "flair"]}
    assert decode_description(encode_description(d)) == d
    with pytest.raises(ValueError, match="unknown targets"):
        encode_description({**d, "targets": ["pd"]})

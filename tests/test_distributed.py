"""Specification of multi-process training: bundle/configs/multi_gpu_train.json over train_segmenter.json and
train.json, with bundle/scripts/runtime/distributed.py.

Each run is the documented command (``torchrun ... -m monai.bundle run --config_file "[base, multi_gpu_train]"``)
with 2 CPU processes (gloo) on the phantom set, plus a third, test-only config whose ``run`` trains and then
saves what each rank ends with (iterations, last batch, weights) to ``<output_dir>/rank<r>.pt``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, REPO, TINY, config_stack

from scripts.runtime.checkpoints import load_checkpoint, load_model
from scripts.runtime.distributed import ddp, rank
from scripts.runtime.networks import SynthesisNet, make_critic

NPROC = 2
#: what each rank reports after training (ids common to both training configs)
REPORT = (
    "'rank': @rank, 'pid': os.getpid(), 'iterations': @train#trainer.state.iteration, "
    "'epoch_length': @train#trainer.state.epoch_length, 'slices': len(@train#dataset)"
)
SAVE = "os.path.join(@output_dir, 'rank' + str(@rank) + '.pt')"
GAN_RUN = [
    "$@train#trainer.run()",
    "$torch.save({" + REPORT + ", 'modality': @train#trainer.state.output['modality'].tolist(), "
    "'batch': list(zip(@train#trainer.state.batch['case'].tolist(), @train#trainer.state.batch['slice'].tolist())), "
    "'generator': @gnetwork.state_dict(), 'critic': @dnetwork.state_dict(), "
    "'segmenter': dict(@seg_network.named_parameters()) if @seg_network is not None else None}, " + SAVE + ")",
]
SEGMENTER_RUN = [
    "$@train#trainer.run()",
    "$torch.save({" + REPORT + ", 'batch': [(int(b['case']), int(b['slice'])) for b in @train#trainer.state.batch], "
    "'segmenter': @network.state_dict()}, " + SAVE + ")",
]


def torchrun(config: str, run: list[str], tmp: Path, dataset_dir: Path, output_dir: Path, **override) -> list[dict]:
    """Run ``config`` + multi_gpu_train.json with 2 processes; return each rank's report, by rank."""
    report_config = tmp / f"report_{config}"
    report_config.write_text(json.dumps({"run": run}))
    files = [*config_stack(config), str(CONFIGS / "multi_gpu_train.json"), str(report_config)]
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}"]
    args += ["-m", "monai.bundle", "run", "--bundle_root", "bundle", "--config_file", str(files)]
    settings = {**TINY, "epoch_length": None, "dataset_dir": dataset_dir, "output_dir": output_dir, **override}
    for k, v in settings.items():
        if v is not None:  # epoch_length None: whole (per-rank) epochs
            args += [f"--{k}", str(v)]
    scratch = tmp / "tmpdir"  # torchrun's torchelastic_* folders go here, removed with the test's folder
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)}
    res = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return [torch.load(output_dir / f"rank{r}.pt", weights_only=False) for r in range(NPROC)]


def assert_same_weights(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{what} differs between ranks in {k}")


def assert_ranks_stepped_together_on_their_own_shard(reports: list[dict], batch_size: int):
    per_rank = -(-reports[0]["slices"] // NPROC) // batch_size  # DistributedSampler pads to equal shards
    assert [r["iterations"] for r in reports] == [per_rank * TINY["max_epochs"]] * NPROC
    assert per_rank < reports[0]["slices"] // batch_size  # a single process would step more often
    assert not set(reports[0]["batch"]) & set(reports[1]["batch"])  # disjoint (case, slice) pairs


def assert_one_writer(run_dir: Path, rank0_pid: int, files: set[str]):
    assert {p.name for p in run_dir.iterdir()} == files | {"tensorboard", "validation.json"}
    events = list((run_dir / "tensorboard").glob("*/events.out.tfevents.*"))  # one folder per run
    assert events and all(e.name.split(".")[-2] == str(rank0_pid) for e in events)  # written by rank 0 only


@pytest.fixture(scope="module")
def ddp_segmenter(phantom_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "runs"
    reports = torchrun("train_segmenter.json", SEGMENTER_RUN, tmp, phantom_dir, out)
    return out, reports


@pytest.mark.slow
def test_segmenter_pretraining_runs_on_two_processes(ddp_segmenter):
    out, reports = ddp_segmenter
    assert [r["rank"] for r in reports] == [0, 1]
    assert_ranks_stepped_together_on_their_own_shard(reports, TINY["batch_size"])
    # parameters by DDP; BatchNorm statistics by SyncBuffers before each validation
    assert_same_weights(reports[0]["segmenter"], reports[1]["segmenter"], "S")
    assert_one_writer(out / "segmenter", reports[0]["pid"], {"model.pt", "checkpoint.pt"})
    s = load_model(str(out / "segmenter" / "model.pt"), kinds="segmenter")  # the bare module's keys: single-process loading
    assert_same_weights(s.state_dict(), reports[0]["segmenter"], "saved S")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tcmgan_bw", "pix2pix"])
def test_gan_trains_on_two_processes_with_identical_weights(ddp_segmenter, phantom_dir, tmp_path, variant):
    """tcmgan_bw: G, D and S wrapped (the WGAN-GP double backward through a DDP critic); pix2pix: per-target
    sub-networks that a rank may leave unused in an iteration (find_unused_parameters).

    S's parameters are compared: its BatchNorm running statistics are rank 0's at the start of every forward
    (DDP's broadcast_buffers) and rank 0's are saved, but each rank's last forward updates its own."""
    seg_dir, _ = ddp_segmenter
    out = tmp_path / "runs"
    override = {"segmenter_ckpt": seg_dir / "segmenter" / "model.pt", "variant": variant}
    reports = torchrun("train.json", GAN_RUN, tmp_path, phantom_dir, out, **override)

    assert_ranks_stepped_together_on_their_own_shard(reports, TINY["batch_size"])
    assert reports[0]["modality"] != reports[1]["modality"]  # each rank draws its own targets
    for net in ("generator", "critic", "segmenter"):
        if reports[0][net] is not None:
            assert_same_weights(reports[0][net], reports[1][net], net)
    assert (reports[0]["segmenter"] is not None) == (variant == "tcmgan_bw")

    run_dir = out / variant
    assert_one_writer(run_dir, reports[0]["pid"], {"model.pt", "checkpoint.pt"})
    saved = load_checkpoint(str(run_dir / "checkpoint.pt"))
    assert saved["trainer"]["iteration"] == reports[0]["iterations"]
    # the unwrapped networks were saved: no "module." prefix, single-process resume and inference load them
    g = SynthesisNet(variant, features=TINY["features"])
    g.load_state_dict(saved["generator"])
    make_critic(variant, features=TINY["features"]).load_state_dict(saved["critic"])
    assert_same_weights(g.state_dict(), reports[0]["generator"], "saved G")
    load_model(str(run_dir / "model.pt"), network=SynthesisNet(variant, features=TINY["features"]))


def test_ddp_passes_through_what_it_does_not_wrap():
    net = torch.nn.Linear(2, 2)
    assert ddp(None, "cpu") is None
    assert ddp(net, "cpu", enabled=False) is net  # e.g. the frozen segmenter of tcmgan
    assert rank() == 0  # no process group in this process
    with pytest.raises(RuntimeError, match="torchrun"):
        ddp(net, "cpu")


def test_overlay_replaces_only_ids_of_the_base_configs():
    """A mistyped id in the overlay would silently add an unused item: every nested id it sets exists in
    train.json (the samplers too: ``null`` there)."""
    overlay = json.loads((CONFIGS / "multi_gpu_train.json").read_text())
    bases = [json.loads((CONFIGS / "train.json").read_text())]
    added = set()

    def has(config, id_):
        for part in id_.split("#"):
            if not isinstance(config, dict) or part not in config:
                return False
            config = config[part]
        return True

    nested = [key.lstrip("+") for key in overlay if "#" in key]
    assert nested and all(any(has(b, id_) for b in bases) for id_ in nested if id_ not in added)

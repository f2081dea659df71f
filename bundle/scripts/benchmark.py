"""Timing of the bundle's training iteration (and, later, inference) on this machine.

    python bundle/scripts/benchmark.py training --features 64 --batch_size 64 --iterations 5

prints seconds per GAN iteration for each variant, run through :class:`scripts.trainer.TCMGANTrainer` on
random 128x128 slices (timing does not depend on the pixel values), after ``warmup`` untimed iterations.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

if __package__ in (None, ""):  # run as a script: make the bundle folder importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ignite.engine import Events  # noqa: E402
from monai.data import DataLoader  # noqa: E402
from monai.losses import DiceLoss  # noqa: E402

from scripts.networks import VARIANTS, SynthesisNet, TumourSegmenter, make_critic  # noqa: E402
from scripts.trainer import TCMGANTrainer  # noqa: E402


def _device(device):
    return torch.device(device) if device else torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(variant: str, features=64, batch_size=64, iterations=5, warmup=2, seg_features=16, device=None):
    """Seconds per iteration (mean over ``iterations`` after ``warmup``) of one variant's GAN iteration."""
    device = _device(device)
    torch.manual_seed(0)
    n = iterations + warmup
    data = [
        {"image": torch.rand(4, 128, 128) * 2 - 1, "label": (torch.rand(1, 128, 128) > 0.9).float()}
        for _ in range(batch_size)
    ]
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    g = SynthesisNet(variant, features).to(device)
    d = make_critic(variant, features).to(device)
    s = TumourSegmenter(seg_features).to(device) if variant in ("tcmgan", "tcmgan_bw") else None
    bw = variant == "tcmgan_bw"
    trainer = TCMGANTrainer(
        device=device,
        max_epochs=n,
        train_data_loader=loader,
        g_network=g,
        g_optimizer=torch.optim.Adam(g.parameters(), 2e-4),
        d_network=d,
        d_optimizer=torch.optim.Adam(d.parameters(), 2e-4),
        seg_network=s,
        s_optimizer=torch.optim.Adam(s.parameters(), 2e-4) if bw else None,
        seg_loss_function=DiceLoss(sigmoid=True, smooth_nr=1, smooth_dr=1),
        train_segmenter=bw,
        lambda_cls=0.0 if variant == "pix2pix" else 10.0,
    )
    stamps = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _stamp(engine):
        _sync(device)
        stamps.append(time.perf_counter())

    trainer.run()
    return (stamps[-1] - stamps[warmup - 1]) / iterations


def training(variants=",".join(VARIANTS), features=64, batch_size=64, iterations=5, warmup=2, device=None, output=None):
    """Print (and optionally save as JSON) seconds per GAN iteration for each variant."""
    variants = variants.split(",") if isinstance(variants, str) else list(variants)
    dev = _device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    rows = []
    print(f"| variant | features | batch | s / iteration | slices / s | device |\n|---|---|---|---|---|---|")
    for v in variants:
        sec = time_training(v, features, batch_size, iterations, warmup, device=dev)
        rows.append({"variant": v, "features": features, "batch_size": batch_size, "seconds": sec, "device": name})
        print(f"| {v} | {features} | {batch_size} | {sec:.3f} | {batch_size / sec:.1f} | {name} |", flush=True)
    if output:
        with open(output, "w") as f:
            json.dump(rows, f, indent=2)
    return None


def inference(input, ckpt_path, repeats=2, sw_batch_size=64, device=None, output=None):
    """Seconds per volume of the ``inference.json`` workflow (start-up excluded) vs the bare generator forward
    on the same number of 128x128 slices; prints one Markdown row per run."""
    import tempfile

    from monai.bundle import ConfigWorkflow

    bundle = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dev = _device(device)
    with tempfile.TemporaryDirectory() as out:
        wf = ConfigWorkflow(
            config_file=os.path.join(bundle, "configs", "inference.json"),
            workflow_type="infer",
            bundle_root=bundle,
            input=input,
            ckpt_path=ckpt_path,
            output_dir=out,
            device=str(dev),
            sw_batch_size=sw_batch_size,
        )
        wf.initialize()
        evaluator = wf.parser.get_parsed_content("evaluator")
        net = wf.parser.get_parsed_content("network")
        rows = []
        for r in range(repeats):
            t0 = time.perf_counter()
            evaluator.run()
            _sync(dev)
            workflow_s = time.perf_counter() - t0
            depth = evaluator.state.output[0]["pred"].shape[-1]
            x = torch.rand(depth, 1, 128, 128, device=dev) * 2 - 1
            t0 = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, depth, sw_batch_size):
                    net(x[i : i + sw_batch_size])
            _sync(dev)
            bare_s = time.perf_counter() - t0
            rows.append({"run": r, "workflow_s": workflow_s, "bare_forward_s": bare_s, "slices": depth})
            print(f"| {r} | {depth} | {workflow_s:.2f} | {bare_s:.2f} | {workflow_s / bare_s:.2f} |", flush=True)
    if output:
        with open(output, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    import fire

    fire.Fire({"training": training, "inference": inference})

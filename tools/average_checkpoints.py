"""Average the weights of several generator checkpoints of one run (the kept ``selection/iteration_<n>.pt`` of a
long run, ``--select_keep true``) into one ``model.pt``: a post-hoc stochastic weight average. A GAN's generator
oscillates from pass to pass (on the 8 shifted test cases of issue #23, FLAIR brain PSNR moved by 1.4 dB between
iterations 2,250 and 3,000 of one run); the average of its late weights is one stable point between them.

    python tools/average_checkpoints.py --checkpoints "[R/selection/iteration_1500.pt,R/selection/iteration_3000.pt]" \\
        --output R/averaged.pt

The checkpoints must describe the same generator (variant, width, image size, scaling, input slices, decoder; the
file's ``arch`` and ``_extra_state``, copied from the first). Every generator of the bundle normalises with
InstanceNorm, which keeps no running statistics, so the average needs no recalibration pass.
"""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bundle"))


def average(checkpoints, output: str) -> str:
    """Write the mean of the floating-point tensors of ``checkpoints`` (a list, or ``"[a,b]"``) to ``output``."""
    import torch

    from scripts.runtime.checkpoints import load_checkpoint, read_model, save_atomic

    if isinstance(checkpoints, str):
        checkpoints = [c for c in checkpoints.strip("[]").split(",") if c]
    if len(checkpoints) < 2:
        raise ValueError(f"--checkpoints {checkpoints}: give two or more generator checkpoints to average")
    archs = [{k: v for k, v in read_model(p).items() if k != "legacy"} for p in checkpoints]
    different = [p for p, a in zip(checkpoints, archs) if a != archs[0]]
    if different:
        raise ValueError(f"{different[0]} describes another generator than {checkpoints[0]}: {archs[0]} vs "
                         f"{archs[checkpoints.index(different[0])]}")  # fmt: skip
    states = [load_checkpoint(p) for p in checkpoints]
    mean = {}
    for key, value in states[0].items():
        if torch.is_floating_point(value):
            mean[key] = torch.stack([s[key].float() for s in states]).mean(0).to(value.dtype)
        else:  # arch and _extra_state: the description, the same in every file
            mean[key] = value
    save_atomic(mean, output)
    print(f"wrote {output}: the mean of {len(checkpoints)} generators")
    return output


if __name__ == "__main__":
    from scripts.runtime.command_line import run_tool

    run_tool(average, serialize=lambda result: None)

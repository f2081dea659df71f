"""The generator's forward in reduced precision against fp32, network only, on the brain slices of one phantom case:
bf16 (torch.autocast) and int8 (ONNX Runtime dynamic quantisation), with their fidelity (PSNR of the difference over
brain pixels, outputs scaled to [0, 1]) and time. The whole-workflow figures are `benchmark.py throughput`'s.

    python tools/precision_probe.py [--threads 2]
"""

import io
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bundle"))
from scripts import phantom  # noqa: E402
from scripts.runtime.checkpoints import load_model  # noqa: E402
from scripts.runtime.data import ScaleBrainIntensityd  # noqa: E402
from scripts.runtime.networks import SynthesisNet  # noqa: E402


def psnr(a, b, mask):
    mse = (((a - b) / 2)[mask] ** 2).mean().item()  # [-1, 1] outputs: half the difference on [0, 1]
    return 10 * np.log10(1 / mse)


def best_time(fn, repeats=2):
    out, times = fn(), []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, min(times)


def main(threads: int = 2):
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.set_num_threads(threads)
    t2 = torch.from_numpy(phantom.make_case(3)["t2"])[None]
    volume = torch.nn.functional.interpolate(t2[None], size=(128, 128, 155), mode="area")[0]
    volume = torch.as_tensor(ScaleBrainIntensityd("image")({"image": volume})["image"])
    brain = (volume[0] != -1).any(0).any(0)
    shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bundle", "models", "model.pt")
    for width in (16, 64):
        if width == 16:
            net = load_model(shipped, "cpu")
        else:
            torch.manual_seed(0)
            net = SynthesisNet("tcmgan", features=64).eval()
        k = int(getattr(net, "in_channels", 1))
        slices = torch.stack([volume[0][..., max(0, min(z + d, volume.shape[-1] - 1))]
                              for z in torch.nonzero(brain).flatten().tolist()
                              for d in range(-(k // 2), k // 2 + 1)]).reshape(-1, k, 128, 128)
        mask = (slices[:, k // 2 : k // 2 + 1] != -1).expand(-1, 3, -1, -1)
        batches = slices.split(48)
        with torch.inference_mode():
            ref, t_fp32 = best_time(lambda: torch.cat([net(b) for b in batches]))

            def bf16():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return torch.cat([net(b) for b in batches]).float()

            out, t = best_time(bf16)
        print(f"width {width}: fp32 torch {t_fp32:.2f} s; bf16 autocast {t:.2f} s, {psnr(out, ref, mask):.1f} dB")
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (slices[:2],), buffer, input_names=["slices"], output_names=["targets"],
                              dynamic_axes={"slices": {0: "n"}, "targets": {0: "n"}}, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.log_severity_level = threads, 3
        with tempfile.TemporaryDirectory() as tmp:
            fp32_path, int8_path = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
            with open(fp32_path, "wb") as f:
                f.write(buffer.getvalue())
            quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QUInt8)
            for name, path in (("ONNX Runtime fp32", fp32_path), ("ONNX Runtime int8 (dynamic)", int8_path)):
                session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                run = lambda: torch.cat([torch.from_numpy(session.run(None, {"slices": b.numpy()})[0]) for b in batches])  # noqa: E731
                out, t = best_time(run)
                print(f"width {width}: {name} {t:.2f} s, {psnr(out, ref, mask):.1f} dB")


if __name__ == "__main__":
    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 2
    main(threads)

"""How much the bundle costs on top of bare PyTorch, measured on this machine: ratios, not absolute times.

    python tools/benchmark.py inference   # inference.json on one 240x240x155 case vs the bare forward
    python tools/benchmark.py throughput  # volumes/min over many cases vs the I/O floor; bf16 vs fp32
    python tools/benchmark.py training    # the bundle's GAN trainer (train.json) vs a plain loop
    python tools/benchmark.py precision   # the recommended model's trainer in fp32 and bf16, GFLOP/s
    python tools/benchmark.py data        # slice loader vs one training step; memory vs number of cases
    python tools/benchmark.py all --output report.json

Every sub-command prints Markdown tables (and writes them as JSON with ``--output``), with the machine and its
load average before and after: on a shared machine only the ratios of measurements interleaved in one run mean
something. Each comparison alternates its two sides ``repeats`` times and reports the median of the per-repeat
ratios. Phantom data (``scripts.phantom``) is made in a temporary folder when no data is given.

- ``inference``: for each device (CPU, and the GPU when there is one) and generator width (16: the shipped
  ``models/model.pt``; 64: the paper's width, random weights, as speed does not depend on them): the whole
  ``inference.json`` workflow on one 240x240x155 case (read, preprocess, network, invert, write 3 NIfTI files;
  start-up excluded) vs the bare forward of the same network on exactly the slices the workflow ran, and on all
  slices, with the workflow's engine (eager PyTorch, or the ONNX Runtime session of ``--backend onnxruntime`` /
  ``auto`` on a CPU); slices/s and volumes/min; where the workflow's time goes.
- ``throughput``: volumes/min of ``inference.json`` over many cases, one after another and with reading ahead and
  background writing, against an I/O-only floor (read the T2s, write three volumes each, no network); fp32 and
  bf16, with the PSNR of bf16's outputs against fp32's.
- ``training``: per variant, iterations/s of ``TCMGANTrainer`` built from ``train.json`` with its handlers and data
  loader vs a plain PyTorch loop (:func:`plain_gan_step`) doing the same forward/backward/optimizer steps on the
  same batches (both call the loss functions of ``scripts.runtime.losses``).
- ``precision``: iterations/s of the recommended model's trainer (``recommended.json``'s settings) in fp32 and in
  bf16 (autocast, ``--precision``), the GFLOP one iteration does, the GFLOP/s that makes, and its share of the
  matrix-product rate this machine reaches in the same number format.
- ``data``: slices/s that ``train.json``'s slice loader delivers (default ``num_workers``) vs slices/s one
  training step consumes; peak and final resident memory after caching N cases, in memory vs ``cache_dir``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import torch

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
if BUNDLE not in sys.path:  # a maintainer's tool beside the bundle: make the bundle folder importable
    sys.path.insert(0, BUNDLE)

from scripts.runtime.checkpoints import read_model, save_atomic  # noqa: E402
from scripts.runtime.files import write_json  # noqa: E402
from scripts.runtime.inference import resolve_backend  # noqa: E402
from scripts.runtime.losses import critic_loss, generator_loss, segmenter_update_loss  # noqa: E402
from scripts.runtime.networks import VARIANTS, SynthesisNet, TumourSegmenter  # noqa: E402
from scripts.runtime.data import draw_targets  # noqa: E402

CONFIGS = os.path.join(BUNDLE, "configs")
SHIPPED_MODEL = os.path.join(BUNDLE, "models", "model.pt")
#: small phantom volumes for the training benchmark (resized to 128x128 like any input), as in the tests
SMALL_SHAPE, SMALL_MIN_PIXELS = (96, 96, 40), 400


# --- machine, timing ----------------------------------------------------------------------------------------------


def machine(device: torch.device | str | None = None) -> str:
    """One line naming the CPU (model, cores, torch threads), the GPU when ``device`` is CUDA, and torch."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if device is not None and torch.device(device).type == "cuda":
        text += f", {torch.cuda.get_device_name(torch.device(device))}"
    return text


def load() -> str:
    """The 1-, 5- and 15-minute load averages (how busy the machine was)."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def devices(device=None) -> list[torch.device]:
    """``device`` (a name or a comma-separated list), else the CPU plus the first GPU when there is one."""
    if device:
        return [torch.device(d) for d in str(device).split(",")]
    return [torch.device("cpu")] + ([torch.device("cuda:0")] if torch.cuda.is_available() else [])


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device) -> tuple[float, float]:
    """``(wall, cpu)`` seconds ``fn()`` takes, the device synchronised before and after; ``cpu`` is this process's
    CPU time (all its threads), which other processes on the machine barely change when torch runs 1 thread."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def set_threads(threads) -> None:
    """``torch.set_num_threads(threads)`` when given (1 makes CPU times comparable on a loaded machine)."""
    if threads:
        torch.set_num_threads(int(threads))


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median of the per-repeat ratios (each pair measured back to back, so load changes mostly cancel)."""
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def table(rows: list[dict], columns: dict[str, str]) -> str:
    """Markdown table of ``rows`` with ``columns`` ``{key: header}`` (floats with 3 significant digits)."""

    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in columns) + " |" for r in rows]
    return "\n".join(lines)


def _report(name: str, rows: list[dict], columns: dict[str, str], meta: dict, output: str | None) -> dict:
    print(f"\n### {name}\n\nmachine: {meta['machine']}; load average before: {meta['load_before']}, "
          f"after: {meta['load_after']}\n")
    print(table(rows, columns), flush=True)
    result = {"benchmark": name, **meta, "rows": rows}
    if output:
        write_json(output, result, indent=2, default=str)
    return result


# --- data made on the fly -----------------------------------------------------------------------------------------


def phantom_dataset(folder: str, num_cases: int, shape=None, seed: int = 0) -> str:
    """``num_cases`` phantom cases (BraTS 2021 layout) and their datalist in ``folder``; returns ``folder``."""
    from scripts.phantom import BRATS_SHAPE, generate
    from scripts.prepare_datalist import prepare_datalist

    generate(folder, num_cases=num_cases, seed=seed, layout="brats2021", shape=shape or BRATS_SHAPE)
    prepare_datalist(folder, seed=seed)
    return folder


def replicated_datalist(folder: str, num_cases: int, split: str = "gan") -> str:
    """A datalist listing ``num_cases`` cases, cycling through the cases of ``folder/datalist.json`` (all splits)
    under distinct case names: memory per cached case depends on the grid, not on the content."""
    with open(os.path.join(folder, "datalist.json")) as f:
        content = json.load(f)
    source = [c for s in ("gan", "seg", "test") for c in content.get(s, [])]
    cases = [{**source[i % len(source)], "case": f"copy{i:04d}"} for i in range(num_cases)]
    path = os.path.join(folder, f"datalist_{num_cases}.json")
    write_json(path, {**content, "gan": cases, "seg": cases[:1], "test": cases[:1]})
    return path


def random_generator_ckpt(path: str, features: int, variant: str = "tcmgan") -> str:
    torch.manual_seed(0)
    save_atomic(SynthesisNet(variant, features).state_dict(), path)
    return path


# --- inference ----------------------------------------------------------------------------------------------------


class _TimedInferer:
    """Wraps the workflow's inferer to time the network part of an iteration."""

    def __init__(self, inferer, device):
        self.inferer, self.device, self.seconds = inferer, device, []

    def __call__(self, *args, **kwargs):
        sync(self.device)
        start = time.perf_counter()
        out = self.inferer(*args, **kwargs)
        sync(self.device)
        self.seconds.append(time.perf_counter() - start)
        return out


#: inference.json settings a row of ``inference`` varies, and the benchmark's defaults for them
#: (one case at a time, nothing overlapped, so that each stage's time is its own; ``throughput`` measures the overlap)
INFERENCE_SETTINGS = {"sw_batch_size": 64, "compile": False, "amp": False, "output_ext": ".nii.gz", "backend": "auto",
                      "precision": "fp32", "prefetch": 0, "background_write": False}  # fmt: skip


def _inference_workflow(input: str, ckpt_path: str, output_dir: str, device, **settings):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=os.path.join(CONFIGS, "inference.json"),
        workflow_type="infer",
        bundle_root=BUNDLE,
        input=input,
        ckpt_path=ckpt_path,
        output_dir=output_dir,
        device=str(device),
        **settings,
    )
    wf.initialize()
    return wf


def time_inference(input: str, ckpt_path: str, device, repeats: int = 3, **settings):
    """One row: the inference.json workflow on ``input`` vs the bare forward on the same slices (see module doc).
    ``settings``: inference.json ids (:data:`INFERENCE_SETTINGS`). With ``amp`` the bare forward runs under
    ``torch.autocast`` of the device; when the workflow runs the network with ONNX Runtime (``backend``), the bare
    forward is the same ONNX Runtime session on the same batches."""
    from ignite.engine import Events

    device = torch.device(device)
    settings = {**INFERENCE_SETTINGS, **settings}
    sw_batch_size, amp = settings["sw_batch_size"], settings["amp"]
    with tempfile.TemporaryDirectory() as out:
        wf = _inference_workflow(input, ckpt_path, out, device, **settings)
        evaluator = wf.parser.get_parsed_content("evaluator")
        network = wf.parser.get_parsed_content("network")
        inferer = wf.parser.get_parsed_content("inferer")
        timer = _TimedInferer(inferer, device)
        evaluator.inferer = timer
        stamps: dict[str, list[float]] = {"load": [], "post": []}
        marks: dict[str, float] = {}
        evaluator.add_event_handler(Events.GET_BATCH_STARTED, lambda e: marks.__setitem__("get", time.perf_counter()))
        evaluator.add_event_handler(
            Events.GET_BATCH_COMPLETED, lambda e: stamps["load"].append(time.perf_counter() - marks["get"])
        )
        evaluator.add_event_handler(Events.ITERATION_STARTED, lambda e: marks.__setitem__("it", time.perf_counter()))

        @evaluator.on(Events.ITERATION_COMPLETED)
        def _post(engine):  # registered after the workflow's postprocessing: its time is what the iteration had left
            stamps["post"].append(time.perf_counter() - marks["it"] - timer.seconds[-1])

        evaluator.run()  # warm-up (and compilation); not timed
        image = evaluator.state.output[0]["image"]
        volume = torch.as_tensor(image).to(device)  # (1, 128, 128, D) preprocessed T2
        depth = volume.shape[-1]
        context = int(getattr(network, "in_channels", 1))  # the shipped model reads 3 neighbouring slices
        _, run = inferer.slices_to_run(volume, context)
        same = inferer.network_input(volume, run, context).contiguous()
        every = inferer.network_input(volume, torch.arange(depth, device=volume.device), context).contiguous()

        session = inferer.runner.session  # not None: the workflow ran ONNX Runtime
        bf16 = inferer.runner.last_engine == "bf16"
        autocast = {"dtype": torch.bfloat16, "enabled": True} if bf16 else {"enabled": bool(amp)}

        def bare(slices, even_split):
            n = slices.shape[0]
            size = -(-n // -(-n // sw_batch_size)) if even_split else sw_batch_size
            with torch.inference_mode(), torch.autocast(device.type, **autocast):
                for start in range(0, n, size):
                    if session is not None:
                        session.run(None, {"slices": slices[start : start + size].contiguous().numpy()})
                    else:
                        network(slices[start : start + size])

        bare(same, True)  # warm-up of the eager path
        runs: dict[str, list[tuple[float, float]]] = {"workflow": [], "same": [], "all": []}
        del timer.seconds[:], stamps["load"][:], stamps["post"][:]
        for _ in range(repeats):
            runs["workflow"].append(timed(evaluator.run, device))
            runs["same"].append(timed(lambda: bare(same, True), device))
            runs["all"].append(timed(lambda: bare(every, False), device))
    wall = {k: [w for w, _ in v] for k, v in runs.items()}
    cpu = {k: [c for _, c in v] for k, v in runs.items()}
    workflow_s = statistics.median(wall["workflow"])
    return {
        "device": device.type,
        "threads": torch.get_num_threads(),
        "features": int(network.arch[1]),
        "backend": "onnxruntime" if session is not None else "torch",
        "precision": "bf16" if bf16 else "fp32",
        "compile": bool(settings["compile"]) and session is None,
        "amp": bool(amp),
        "output_ext": settings["output_ext"],
        "slices": depth,
        "slices_run": f"{int(run.numel())} / {depth}",
        "workflow_s": workflow_s,
        "bare_same_s": statistics.median(wall["same"]),
        "workflow_over_bare": median_ratio(wall["workflow"], wall["same"]),
        "workflow_over_bare_cpu": median_ratio(cpu["workflow"], cpu["same"]),
        "bare_all_s": statistics.median(wall["all"]),
        "workflow_over_bare_all": median_ratio(wall["workflow"], wall["all"]),
        "workflow_cpu_s": statistics.median(cpu["workflow"]),
        "slices_per_s": depth / workflow_s,
        "volumes_per_min": 60.0 / workflow_s,
        "load_s": statistics.median(stamps["load"]),
        "network_s": statistics.median(timer.seconds),
        "post_s": statistics.median(stamps["post"]),
        "repeats": repeats,
    }


INFERENCE_COLUMNS = {
    "device": "device",
    "threads": "threads",
    "features": "width",
    "backend": "backend",
    "precision": "precision",
    "compile": "compiled",
    "amp": "amp",
    "output_ext": "written as",
    "slices_run": "slices run",
    "workflow_s": "workflow s",
    "bare_same_s": "bare forward, same slices, s",
    "workflow_over_bare": "workflow / bare (wall)",
    "workflow_over_bare_cpu": "workflow / bare (CPU time)",
    "bare_all_s": "bare forward, all slices, s",
    "workflow_over_bare_all": "workflow / bare all slices (wall)",
    "workflow_cpu_s": "workflow CPU s",
    "slices_per_s": "slices/s",
    "volumes_per_min": "volumes/min",
    "load_s": "read + preprocess s",
    "network_s": "network s",
    "post_s": "invert + write s",
}


def _choices(flag) -> list[bool]:
    """``"both"`` -> [False, True]; otherwise the flag as a one-element list."""
    return [False, True] if str(flag).lower() == "both" else [str(flag).lower() in ("true", "1")]


def _values(option) -> list:
    """A comma-separated option (or a list) -> its values."""
    return list(option) if isinstance(option, (list, tuple)) else str(option).split(",")


def inference(
    input: str | None = None,
    widths="16,64",
    device=None,
    repeats: int = 3,
    sw_batch_size: int = 64,
    backend="auto",
    compile=False,
    amp=False,
    output_ext=".nii.gz",
    precision="fp32",
    threads=None,
    output: str | None = None,
):
    """Inference workflow vs bare forward (module doc), one case at a time without overlap (``throughput``
    measures many cases with reading and writing overlapped). ``input``: a 240x240x155 T2 volume (default: one phantom
    case made here). ``widths``: generator widths; the shipped model.pt is used for its own width, random weights
    for the others. ``backend``: inference.json's (``auto``, ``torch``, ``onnxruntime``; several comma-separated
    give a row each). ``compile`` and ``amp``: False, True, or "both" (a row for each; ``compile`` only with the
    torch backend, ``amp`` only on a GPU, as the workflow's autocast is for CUDA). ``output_ext``: ``.nii.gz``,
    ``.nii`` or both (``.nii.gz,.nii``), the workflow's outputs. ``precision``: ``fp32``, ``bf16`` or both
    (``fp32,bf16``; bf16 runs with torch, whatever the backend). ``threads``: torch CPU threads."""
    set_threads(threads)
    widths = [int(w) for w in _values(widths)]
    grid = [
        {"backend": b, "compile": c, "amp": a, "output_ext": e, "precision": q}
        for b in _values(backend) for c in _choices(compile) for a in _choices(amp) for e in _values(output_ext)
        for q in _values(precision)
    ]  # fmt: skip
    shipped = read_model(SHIPPED_MODEL, "generator")["features"] if os.path.isfile(SHIPPED_MODEL) else None
    meta = {"machine": machine(devices(device)[-1]), "load_before": load()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not input:
            phantom_dataset(os.path.join(tmp, "data"), 1)
            input = os.path.join(tmp, "data", "BraTS2021_00000", "BraTS2021_00000_t2.nii.gz")
        for dev in devices(device):
            for width in widths:
                ckpt = SHIPPED_MODEL if shipped == width else None
                ckpt = ckpt or random_generator_ckpt(os.path.join(tmp, f"model_f{width}.pt"), width)
                for settings in grid:
                    try:
                        engine = resolve_backend(settings["backend"], dev.type)
                    except (ValueError, ImportError):  # onnxruntime on a GPU, or not installed: no such row
                        continue
                    if settings["precision"] == "bf16" and (settings["compile"] or settings["backend"] != grid[0]["backend"]):
                        continue  # bf16 runs eager torch whatever the backend and compile: one row of it
                    if (settings["amp"] and dev.type != "cuda") or (settings["compile"] and engine != "torch"):
                        continue  # autocast is for CUDA; compile for the torch backend
                    rows.append(time_inference(input, ckpt, dev, repeats, sw_batch_size=sw_batch_size, **settings))
                    print(table(rows[-1:], INFERENCE_COLUMNS).splitlines()[-1], flush=True)
    meta["load_after"] = load()
    meta["input"] = input
    return _report("inference", rows, INFERENCE_COLUMNS, meta, output)


# --- throughput ---------------------------------------------------------------------------------------------------


def io_floor(cases: list[dict], output_dir: str, output_ext: str = ".nii.gz") -> float:
    """Seconds to read each case's T2 (``LoadVolumed``, with its checks) and write three volumes of its grid
    (``SaveTargetsd``, in the workflow's format), one case after another, without preprocessing or network: what
    no inference can go below. The written volumes are the T2 scaled to [0, 1], so they compress like outputs."""
    from monai.data import MetaTensor

    from scripts.runtime.inference import LoadVolumed, SaveTargetsd

    load, save = LoadVolumed("image"), SaveTargetsd(output_dir=output_dir, output_ext=output_ext)
    start = time.perf_counter()
    for case in cases:
        t2 = load({"image": case["modalities"]["t2"]})["image"]
        scaled = (t2 / t2.max())[None]
        save({"pred": scaled.expand(3, *t2.shape), "mask": MetaTensor(scaled, affine=t2.affine), "case": case["case"]})
    return time.perf_counter() - start


def _brain_psnr(a_dir: str, b_dir: str, names: list[str], masks: dict[str, "np.ndarray"]) -> tuple[float, float]:
    """(lowest, mean) over ``names`` of the PSNR of the difference of two runs' outputs (intensities in [0, 1]),
    over the voxels of each case's ``masks`` (the T2's brain)."""
    import nibabel as nib
    import numpy as np

    values = []
    for name in names:
        mask = masks[name.rsplit("_", 1)[0]]
        a = np.asanyarray(nib.load(os.path.join(a_dir, name)).dataobj)[mask]
        b = np.asanyarray(nib.load(os.path.join(b_dir, name)).dataobj)[mask]
        mse = float(np.mean((a.astype(np.float64) - b) ** 2))
        values.append(10 * np.log10(1.0 / mse) if mse > 0 else float("inf"))
    return min(values), float(np.mean(values))


def throughput(
    dataset_dir: str | None = None,
    num_cases: int = 8,
    widths="16",
    device=None,
    precision="fp32,bf16",
    output_ext=".nii.gz",
    repeats: int = 3,
    threads=None,
    output: str | None = None,
):
    """Volumes per minute of ``inference.json`` over many cases, against the I/O floor (:func:`io_floor`).

    For each device and width, and each ``precision``: the workflow one case after another (``--prefetch 0
    --background_write false``) and with reading ahead and writing in the background (the defaults); after one
    warm-up pass each (ONNX export, allocations), the configurations take turns for ``repeats`` timed passes over
    the cases, and each row gives the median. bf16 rows give the
    PSNR of their outputs against the fp32 outputs of the same run, over each case's brain (lowest and mean over
    volumes and targets). ``dataset_dir``: a folder with ``datalist.json`` (its ``test`` split; default:
    ``num_cases`` phantom cases made here, BraTS grid)."""
    import nibabel as nib
    import numpy as np

    set_threads(threads)
    widths = [int(w) for w in _values(widths)]
    precisions = _values(precision)
    shipped = read_model(SHIPPED_MODEL, "generator")["features"] if os.path.isfile(SHIPPED_MODEL) else None
    meta = {"machine": machine(devices(device)[-1]), "load_before": load()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not dataset_dir:
            dataset_dir = phantom_dataset(os.path.join(tmp, "data"), num_cases)
            datalist = os.path.join(dataset_dir, "datalist_all.json")  # every case in "test" (paths relative to it)
            with open(os.path.join(dataset_dir, "datalist.json")) as f:
                content = json.load(f)
            write_json(datalist, {**content, "test": [c for s in ("gan", "seg", "test") for c in content.get(s, [])]})
        else:
            datalist = os.path.join(dataset_dir, "datalist.json")
        from scripts.runtime.cases import inference_cases

        cases = inference_cases(datalist=datalist, split="test")
        masks = {c["case"]: np.asanyarray(nib.load(c["modalities"]["t2"]).dataobj) > 0 for c in cases}
        floor_s = io_floor(cases, os.path.join(tmp, "floor"), output_ext)
        floor = {"mode": "I/O floor (read + write, no network)", "cases": len(cases),
                 "s_per_volume": floor_s / len(cases), "volumes_per_min": 60 * len(cases) / floor_s}  # fmt: skip
        rows.append(floor)
        print(table(rows[-1:], THROUGHPUT_COLUMNS).splitlines()[-1], flush=True)
        from monai.bundle import ConfigWorkflow

        for dev in devices(device):
            for width in widths:
                ckpt = SHIPPED_MODEL if shipped == width else None
                ckpt = ckpt or random_generator_ckpt(os.path.join(tmp, f"model_f{width}.pt"), width)
                runs = []  # (row, evaluator, output folder), each warmed up by one pass over the cases
                for prec in precisions:
                    for overlapped in (False, True):
                        out = os.path.join(tmp, f"out_{dev.type}_{width}_{prec}_{overlapped}")
                        settings = {"precision": prec, "prefetch": 1 if overlapped else 0,
                                    "background_write": overlapped, "output_ext": output_ext}  # fmt: skip
                        wf = ConfigWorkflow(
                            config_file=os.path.join(CONFIGS, "inference.json"), workflow_type="infer",
                            bundle_root=BUNDLE, datalist=datalist, datalist_split="test", ckpt_path=ckpt,
                            output_dir=out, device=str(dev), overwrite=True, **settings,
                        )  # fmt: skip
                        wf.initialize()
                        evaluator = wf.parser.get_parsed_content("evaluator")
                        evaluator.run()  # warm-up pass (ONNX export, allocations)
                        engine = wf.parser.get_parsed_content("inferer").runner.last_engine
                        row = {"device": dev.type, "features": width, "precision": prec, "engine": engine,
                               "mode": "read ahead + background write" if overlapped else "one case after another",
                               "cases": len(cases), "repeats": repeats}  # fmt: skip
                        runs.append((row, evaluator, out))
                seconds: list[list[float]] = [[] for _ in runs]
                for _ in range(repeats):  # the configurations alternate, so a change of load hits them all
                    for i, (_, evaluator, _) in enumerate(runs):
                        seconds[i].append(timed(evaluator.run, dev)[0])
                reference = next((out for row, _, out in runs if row["precision"] == "fp32"), None)
                for (row, _, out), times in zip(runs, seconds):
                    per_volume = statistics.median(times) / len(cases)
                    row.update(s_per_volume=per_volume, volumes_per_min=60 / per_volume,
                               of_floor=floor["s_per_volume"] / per_volume)  # fmt: skip
                    if reference is not None and row["precision"] != "fp32":
                        names = sorted(f for f in os.listdir(out) if not f.startswith("."))
                        row["psnr_min"], row["psnr_mean"] = _brain_psnr(reference, out, names, masks)
                    rows.append(row)
                    print(table(rows[-1:], THROUGHPUT_COLUMNS).splitlines()[-1], flush=True)
    meta["load_after"] = load()
    return _report("throughput", rows, THROUGHPUT_COLUMNS, meta, output)


THROUGHPUT_COLUMNS = {
    "device": "device",
    "features": "width",
    "precision": "precision",
    "engine": "network engine",
    "mode": "pipeline",
    "cases": "cases",
    "repeats": "repeats",
    "s_per_volume": "s / volume",
    "volumes_per_min": "volumes/min",
    "of_floor": "share of the I/O floor's rate",
    "psnr_min": "PSNR vs fp32, lowest (dB)",
    "psnr_mean": "PSNR vs fp32, mean (dB)",
}


# --- training -----------------------------------------------------------------------------------------------------


def plain_gan_step(
    g,
    d,
    s,
    g_opt,
    d_opt,
    s_opt,
    seg_loss,
    image: torch.Tensor,
    label: torch.Tensor,
    lambda_l1=0.1,
    lambda_cls=10.0,
    lambda_seg=50.0,
    lambda_gp=100.0,
    d_train_steps=1,
    reduction="sum",
    train_segmenter=False,
    num_targets=3,
) -> None:
    """One TC-MGAN iteration written as a plain PyTorch loop body: the same loss functions
    (:mod:`scripts.runtime.losses`, eq. 6, 7 and 4), forward, backward and optimizer steps as
    :meth:`scripts.runtime.trainer.TCMGANTrainer._iteration`, in the same order (so the same random draws), without
    the engine or the output dict. ``image`` ``(B, 4, H, W)``, ``label`` ``(B, 1, H, W)``."""
    x, k, y, tumour = draw_targets(image, label, num_targets)
    g.train()
    d.train()
    if s is not None:
        s.train(train_segmenter)
    for _ in range(d_train_steps):
        with torch.no_grad():
            fake = g(x, k)
        d_opt.zero_grad(set_to_none=True)
        d_loss, _ = critic_loss(d, x, y, fake, k, lambda_cls, lambda_gp, reduction)
        d_loss.backward()
        d_opt.step()
    d.requires_grad_(False)
    g_opt.zero_grad(set_to_none=True)
    fake = g(x, k)
    g_loss, _ = generator_loss(d, x, y, fake, k, lambda_cls, lambda_l1, lambda_seg, reduction, s, tumour, seg_loss)
    g_loss.backward()
    g_opt.step()
    d.requires_grad_(True)
    if train_segmenter:
        s_opt.zero_grad(set_to_none=True)
        s_loss, _ = segmenter_update_loss(s, fake, y, k, tumour, seg_loss)
        s_loss.backward()
        s_opt.step()


def plain_step_for(trainer) -> Callable[[dict], None]:
    """:func:`plain_gan_step` bound to a ``TCMGANTrainer``'s networks, optimizers and settings: ``step(batch)``."""
    t = trainer

    def step(batch: dict) -> None:
        image = batch["image"].to(t.state.device)
        label = batch["label"].to(t.state.device)
        g = getattr(t.g_network, "module", t.g_network)
        plain_gan_step(
            g, t.d_network, t.seg_network, t.g_optimizer, t.d_optimizer, t.s_optimizer, t.seg_loss_function,
            image, label, t.lambda_l1, t.lambda_cls, t.lambda_seg, t.lambda_gp, t.d_train_steps, t.reduction,
            t.train_segmenter, t.num_targets,
        )  # fmt: skip

    return step


def training_workflow(dataset_dir: str, output_dir: str, variant: str, **override):
    """``train.json`` initialised for a benchmark: no validation, checkpoints only at the epoch end, a random
    segmenter for the TC-MGAN variants (speed does not depend on its weights)."""
    from monai.bundle import ConfigWorkflow

    seg = os.path.join(output_dir, "segmenter_random.pt")
    if not os.path.isfile(seg):
        os.makedirs(output_dir, exist_ok=True)
        save_atomic(TumourSegmenter(features=16).state_dict(), seg)
    settings = dict(
        dataset_dir=dataset_dir, output_dir=output_dir, variant=variant, segmenter_ckpt=seg, max_epochs=1,
        val_interval=10**9, checkpoint_every=0, cache_num_workers=0,
    )  # fmt: skip
    settings.update(override)
    wf = ConfigWorkflow(
        config_file=os.path.join(CONFIGS, "train.json"),
        logging_file=os.path.join(CONFIGS, "logging.conf"),
        workflow_type="train",
        bundle_root=BUNDLE,
        **settings,
    )
    wf.initialize()
    return wf


def time_training(
    dataset_dir: str,
    variant: str,
    features=16,
    batch_size=16,
    iterations=3,
    repeats=3,
    device=None,
    plain=True,
    warmup: int = 1,
    **override,
):
    """One row: per-iteration seconds of the bundle's trainer (``train.json``: its loader, handlers and logging)
    and of :func:`plain_gan_step` on the same batches, alternating blocks of ``iterations`` after ``warmup``
    untimed iterations (on a GPU, new batch shapes -- pix2pix routes a varying number of samples to each
    target's networks -- first cost cuDNN plan building, so give it more). Each block is timed as a whole, the
    device synchronised only at its ends, as a real loop runs. ``plain=False``: the trainer alone.
    ``override``: more train.json ids."""
    from ignite.engine import Events

    device = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as out:
        wf = training_workflow(
            dataset_dir, out, variant, features=features, batch_size=batch_size, device=str(device),
            epoch_length=warmup + repeats * iterations, **override,
        )  # fmt: skip
        slices = len(wf.parser.get_parsed_content("train#dataset"))
        if slices < batch_size:  # drop_last: not one batch per epoch, nothing to time
            raise ValueError(
                f"the 'gan' split of {dataset_dir} holds {slices} slices, fewer than one batch of {batch_size}: "
                "pass --dataset_dir with more cases or a smaller --batch_size"
            )
        trainer = wf.parser.get_parsed_content("train#trainer")
        step = plain_step_for(trainer)
        batches, trainer_s, plain_s = [], [], []
        clock = {"start": None}

        def start_clock():
            sync(device)
            clock["start"] = (time.perf_counter(), time.process_time())

        @trainer.on(Events.ITERATION_COMPLETED)
        def _measure(engine):  # runs after the config's handlers, so their cost is in the trainer's time
            if engine.state.iteration < warmup:
                return
            if engine.state.iteration == warmup:
                return start_clock()
            batches.append(engine.state.batch)
            if len(batches) == iterations:  # a block done: its time, then the plain loop's turn
                sync(device)
                now = (time.perf_counter(), time.process_time())
                trainer_s.append(((now[0] - clock["start"][0]) / iterations, (now[1] - clock["start"][1]) / iterations))
                if plain:
                    wall, cpu = timed(lambda: [step(batch) for batch in batches], device)
                    plain_s.append((wall / iterations, cpu / iterations))
                batches.clear()
                start_clock()

        trainer.run()
    t_wall, t_cpu = [w for w, _ in trainer_s], [c for _, c in trainer_s]
    p_wall, p_cpu = [w for w, _ in plain_s], [c for _, c in plain_s]
    t = statistics.median(t_wall)
    return {
        "variant": variant,
        "features": features,
        "batch_size": batch_size,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "trainer_it_per_s": 1 / t,
        "plain_it_per_s": 1 / statistics.median(p_wall) if plain else None,
        "trainer_over_plain": median_ratio(t_wall, p_wall) if plain else None,
        "trainer_over_plain_cpu": median_ratio(t_cpu, p_cpu) if plain else None,
        "trainer_slices_per_s": batch_size / t,
        "blocks": f"{len(trainer_s)} x {iterations}",
    }


TRAINING_COLUMNS = {
    "variant": "variant",
    "device": "device",
    "features": "width",
    "batch_size": "batch",
    "trainer_it_per_s": "trainer it/s",
    "plain_it_per_s": "plain loop it/s",
    "threads": "threads",
    "trainer_over_plain": "trainer / plain (wall)",
    "trainer_over_plain_cpu": "trainer / plain (CPU time)",
    "trainer_slices_per_s": "slices/s consumed",
    "blocks": "blocks x iterations",
}


def training(
    variants=",".join(VARIANTS),
    features=None,
    batch_size=None,
    iterations: int = 3,
    repeats: int = 3,
    warmup=None,
    log_every=None,
    device=None,
    dataset_dir: str | None = None,
    threads=None,
    output: str | None = None,
):
    """Trainer vs plain loop for each variant (module doc). ``features``/``batch_size`` default to 64/64 on a GPU
    and 16/16 on a CPU (the paper's size takes ~10+ s per iteration on 2 cores; the ratio is what matters).
    ``warmup``: untimed iterations first (default 1 on a CPU, 20 on a GPU). ``log_every``: train.json's (the
    loss terms go to the log and TensorBoard every ``log_every`` iterations; default: the config's).
    ``threads``: torch CPU threads."""
    set_threads(threads)
    variants = variants.split(",") if isinstance(variants, str) else list(variants)
    dev = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    features = features or (64 if dev.type == "cuda" else 16)
    batch_size = batch_size or (64 if dev.type == "cuda" else 16)
    warmup = int(warmup or (20 if dev.type == "cuda" else 1))
    override = {} if log_every is None else {"log_every": int(log_every)}
    meta = {"machine": machine(dev), "load_before": load(), "warmup": warmup, **override}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        small = {} if dataset_dir else {"min_brain_pixels": SMALL_MIN_PIXELS}
        # ~25 kept slices per small case, 35 % of the cases in the 'gan' split: enough for a few batches
        cases = max(6, -(-4 * batch_size // 25))
        data = dataset_dir or phantom_dataset(os.path.join(tmp, "data"), cases, shape=SMALL_SHAPE)
        for v in variants:
            settings = {"warmup": warmup, **small, **override}
            rows.append(time_training(data, v, features, batch_size, iterations, repeats, dev, **settings))
            print(table(rows[-1:], TRAINING_COLUMNS).splitlines()[-1], flush=True)
    meta["load_after"] = load()
    return _report("training", rows, TRAINING_COLUMNS, meta, output)


# --- precision ----------------------------------------------------------------------------------------------------


def matmul_rate(dtype=torch.float32, size: int = 1024, seconds: float = 1.0) -> float:
    """GFLOP/s of a ``size`` x ``size`` matrix product in ``dtype`` on the CPU with the current threads: the
    machine's practical peak for that number format (bf16 without native support is emulated, and slow)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    n, start = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e9


def iteration_gflop(trainer) -> float:
    """Floating-point work of one GAN iteration of ``trainer`` (a ``TCMGANTrainer``) in GFLOP, counted by
    ``torch.utils.flop_counter`` over one real iteration on one batch of its loader (forward and backward of G,
    D and S, the gradient penalty's double backward included). ``FlopCounterMode`` itself cannot be used: its
    module tracking refuses ``autograd.grad``, so its per-operator formulas are applied here to every operator."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Counter(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Counter.flops += formula(*args, **kwargs, out_val=out)
            return out

    batch = next(iter(trainer.data_loader))
    with Counter():
        trainer._iteration(trainer, batch)
    return Counter.flops / 1e9


def precision(
    precisions: str = "fp32,bf16",
    features: int = 16,
    batch_size: int = 16,
    iterations: int = 2,
    repeats: int = 2,
    device=None,
    dataset_dir: str | None = None,
    threads=None,
    output: str | None = None,
):
    """The recommended model's trainer (``train.json`` + ``recommended.json``'s settings) in each of ``precisions``:
    iterations/s, the GFLOP of one iteration, the GFLOP/s reached, and that as a share of the machine's matmul
    rate in the same number format (:func:`matmul_rate`); whether this CPU computes bf16 natively."""
    from scripts.runtime.precision import native_bf16

    set_threads(threads)
    dev = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    with open(os.path.join(CONFIGS, "recommended.json")) as f:
        recommended = {k: v for k, v in json.load(f).items() if k in ("context", "upsample", "augmentation")}
    meta = {"machine": machine(dev), "load_before": load(), "native_bf16": native_bf16(),
            "context": recommended["context"], "upsample": recommended["upsample"],
            "augment": bool(recommended["augmentation"])}  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        small = {} if dataset_dir else {"min_brain_pixels": SMALL_MIN_PIXELS}
        data = dataset_dir or phantom_dataset(os.path.join(tmp, "data"), max(6, -(-4 * batch_size // 25)),
                                              shape=SMALL_SHAPE)  # fmt: skip
        for name in str(precisions).split(","):
            settings = {**recommended, **small, "precision": name}
            row = time_training(data, "tcmgan", features, batch_size, iterations, repeats, dev, plain=False,
                                **settings)  # fmt: skip
            wf = training_workflow(data, os.path.join(tmp, "flops"), "tcmgan", features=features,
                                   batch_size=batch_size, device=str(dev), epoch_length=1, **settings)  # fmt: skip
            gflop = iteration_gflop(wf.parser.get_parsed_content("train#trainer"))
            peak = matmul_rate(torch.bfloat16 if name == "bf16" else torch.float32) if dev.type == "cpu" else None
            row.update(precision=name, gflop_per_it=gflop, gflops=gflop * row["trainer_it_per_s"], matmul_peak=peak,
                       share_of_peak=gflop * row["trainer_it_per_s"] / peak if peak else None)
            rows.append(row)
            print(table(rows[-1:], PRECISION_COLUMNS).splitlines()[-1], flush=True)
    base = next((r["trainer_it_per_s"] for r in rows if r["precision"] == "fp32"), None)
    for r in rows:
        r["speed_vs_fp32"] = r["trainer_it_per_s"] / base if base else None
    meta["load_after"] = load()
    return _report("precision", rows, PRECISION_COLUMNS, meta, output)


PRECISION_COLUMNS = {
    "precision": "precision",
    "device": "device",
    "threads": "threads",
    "features": "width",
    "batch_size": "batch",
    "trainer_it_per_s": "it/s",
    "speed_vs_fp32": "x fp32",
    "gflop_per_it": "GFLOP / it",
    "gflops": "GFLOP/s",
    "matmul_peak": "matmul GFLOP/s (same format)",
    "share_of_peak": "share of matmul rate",
}


# --- data ---------------------------------------------------------------------------------------------------------


def _memory_status() -> dict:
    """Resident memory of this process in MB: peak (VmHWM), now (VmRSS), anonymous and file-backed parts."""
    fields = {"VmHWM": "peak_rss_mb", "VmRSS": "rss_mb", "RssAnon": "anon_mb", "RssFile": "file_mb"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in fields:
                out[fields[key]] = int(line.split()[1]) / 1024
    return out


def memory_probe(datalist: str, cache_dir: str = "", touch: bool = True, **override) -> dict:
    """Build ``train.json``'s training cache over every case of ``datalist`` (split ``gan``) in this process and
    report its memory (MB) before, after caching and after reading every slice once (``touch``). Run it in a fresh
    process (``python benchmark.py memory_probe ...``) so that the peak is this cache's. ``override``: more
    train.json ids."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(CONFIGS, "train.json"))
    parser.update({
        "bundle_root": BUNDLE, "data_list_file_path": datalist, "dataset_dir": os.path.dirname(datalist),
        "cache_dir": cache_dir or None, "cache_num_workers": 2, **override,
    })  # fmt: skip
    before = _memory_status()
    start = time.perf_counter()
    volumes = parser.get_parsed_content("train#volumes")
    fill_s = time.perf_counter() - start
    cached = _memory_status()
    slices = 0
    if touch:
        dataset = parser.get_parsed_content("train#dataset")
        for i in range(len(dataset)):
            dataset[i]
        slices = len(dataset)
    after = _memory_status()
    return {
        "cases": len(volumes), "slices": slices, "fill_s": fill_s, "base_mb": before["rss_mb"],
        "filled_mb": cached["rss_mb"], "peak_mb": after["peak_rss_mb"], "anon_mb": after["anon_mb"],
        "file_mb": after["file_mb"],
        "cache": "disk (cache_dir)" if cache_dir else "memory",
    }  # fmt: skip


def loader_rate(dataset_dir: str, batches: int = 20, num_workers=None, batch_size: int = 64) -> dict:
    """Slices/s ``train.json``'s training data loader delivers from its filled cache (default ``num_workers``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(CONFIGS, "train.json"))
    settings = {"bundle_root": BUNDLE, "dataset_dir": dataset_dir, "batch_size": batch_size}
    if num_workers is not None:
        settings["num_workers"] = num_workers
    parser.update(settings)
    start = time.perf_counter()
    loader = parser.get_parsed_content("train#dataloader")
    fill_s = time.perf_counter() - start
    n, start = 0, time.perf_counter()
    while n < batches:
        for batch in loader:
            n += 1
            if n >= batches:
                break
    seconds = time.perf_counter() - start
    cases = len(parser.get_parsed_content("train#volumes"))
    return {
        "num_workers": parser.get_parsed_content("num_workers"), "loader_slices_per_s": batches * batch_size / seconds,
        "cache_fill_cases_per_s": cases / fill_s, "cases": cases,
    }  # fmt: skip


DATA_COLUMNS = {
    "device": "device",
    "features": "width",
    "num_workers": "loader workers",
    "loader_slices_per_s": "loader slices/s",
    "step_slices_per_s": "one training step consumes, slices/s",
    "loader_over_step": "loader / consumption",
    "cache_fill_cases_per_s": "cache fill, cases/s",
}
MEMORY_COLUMNS = {
    "cache": "cache",
    "cases": "cases",
    "slices": "slices",
    "fill_s": "fill s",
    "base_mb": "before, MB",
    "filled_mb": "RSS after filling, MB",
    "peak_mb": "peak RSS, MB",
    "anon_mb": "anonymous, MB",
    "file_mb": "file-backed (page cache), MB",
    "mb_per_case": "peak MB per case",
}


def data(
    cases="10,25,50,100",
    unique_cases: int = 5,
    features=None,
    batch_size: int = 64,
    device=None,
    step_iterations: int = 2,
    dataset_dir: str | None = None,
    threads=None,
    output: str | None = None,
):
    """Loader vs training consumption, and memory vs number of cases (module doc).

    The loader runs on ``unique_cases`` full-size phantom cases; a training step is timed with the bundle's
    trainer at ``features`` (default 64, the paper's) and ``batch_size``, after one warm-up iteration. Memory is
    measured in a fresh process per point, for datalists of ``cases`` cases that cycle through the unique ones
    (``--cases ""``: no memory part). ``threads``: torch CPU threads."""
    set_threads(threads)
    counts = [int(c) for c in (str(cases).split(",") if not isinstance(cases, (list, tuple)) else cases) if c]
    dev = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    features = features or 64
    meta = {"machine": machine(dev), "load_before": load()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = dataset_dir or phantom_dataset(os.path.join(tmp, "data"), unique_cases)
        rate = loader_rate(folder, batch_size=batch_size)
        warmup = 20 if dev.type == "cuda" else 1  # as ``training``: cuDNN plans for new shapes first
        step = time_training(folder, "tcmgan", features, batch_size, step_iterations, 1, dev, False, warmup)
        rows = [{
            "device": dev.type, "features": features, **rate, "step_slices_per_s": step["trainer_slices_per_s"],
            "loader_over_step": rate["loader_slices_per_s"] / step["trainer_slices_per_s"],
        }]  # fmt: skip
        _report("data: loader vs training step", rows, DATA_COLUMNS, {**meta, "load_after": load()}, None)
        memory = []
        for cache_dir in ("", os.path.join(tmp, "cache")):
            for n in counts:
                datalist = replicated_datalist(folder, n)
                command = [sys.executable, os.path.abspath(__file__), "memory_probe", "--datalist", datalist]
                command += ["--cache_dir", cache_dir] if cache_dir else []
                res = subprocess.run(command, capture_output=True, text=True, check=True)
                row = json.loads(res.stdout.strip().splitlines()[-1])
                row["mb_per_case"] = (row["peak_mb"] - row["base_mb"]) / n
                memory.append(row)
                print(table(memory[-1:], MEMORY_COLUMNS).splitlines()[-1], flush=True)
                if cache_dir:  # the next count starts from an empty cache too
                    for name in os.listdir(cache_dir):
                        os.remove(os.path.join(cache_dir, name))
    meta["load_after"] = load()
    _report("data: memory vs cases", memory, MEMORY_COLUMNS, meta, None)
    result = {"benchmark": "data", **meta, "loader": rows, "memory": memory}
    if output:
        write_json(output, result, indent=2, default=str)
    return result


def _memory_probe_cli(datalist: str, cache_dir: str = "", touch: bool = True) -> None:
    print(json.dumps(memory_probe(datalist, cache_dir, touch)))


def run_all(device=None, threads=None, output: str | None = None):
    """``all``: ``inference``, ``throughput``, ``training`` and ``data`` with their defaults; ``output``: one JSON
    with the four."""
    results = {
        "inference": inference(device=device, threads=threads),
        "throughput": throughput(device=device, threads=threads),
        "training": training(device=device, threads=threads),
        "data": data(device=device, threads=threads),
    }
    if output:
        write_json(output, results, indent=2, default=str)


if __name__ == "__main__":
    from scripts.runtime.command_line import run_tool

    commands = {"inference": inference, "throughput": throughput, "training": training, "precision": precision,
                "data": data, "all": run_all}
    # the tables are printed as they are measured; the returned dicts are for callers in Python
    run_tool({**commands, "memory_probe": _memory_probe_cli}, serialize=lambda result: None)

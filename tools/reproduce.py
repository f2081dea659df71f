"""Run the paper's whole study in order and write ``R/results.md``: Table 1, Table 2 and a Fig. 3-like figure.

    python tools/reproduce.py --preset smoke|cpu|gpu|paper --output_dir R [--dataset_dir D] [--device cpu]
        [--seeds 3] [--jobs 6]

Stages, in order (each one a bundle command, its output logged to ``R/logs/<stage>.log``):

1. ``phantoms``: a BraTS-like phantom set and its datalist (skipped when ``--dataset_dir`` is given; that folder must
   hold a ``datalist.json`` from ``prepare_datalist.py``);
2. ``segmenter``: pre-training of the tumour segmenter S (``train_segmenter.json``); its validation Dice goes into
   the report;
3. ``gan_<variant>``: the four GAN variants pix2pix, MGAN, TC-MGAN (frozen S), TC-MGAN bw (``train.json``), and the
   recommended model (``recommended.json``) in the ``gpu`` preset;
4. ``table1_<variant>`` and ``table1``: synthesis quality on the test split, with the T2 and inverted-T2 baselines
   (``evaluate.json``), merged into ``R/table1/table1.md``;
5. ``seg_<input>`` and ``table2``: the downstream U-Nets on T2 only, T2 + each variant's synthesis and the four real
   modalities (``train_downstream.json``), scored on the test split (``evaluate_downstream.json``), merged into
   ``R/table2/table2.md``, with a sanity check (4 real modalities must beat T2 alone by more than the seed spread,
   or the table says the downstream numbers are not interpretable);
6. ``report``: the figure and ``R/results.md`` (tables, commands, versions, preset, wall time per stage).

``--seeds N`` repeats the stochastic stages (2, 3 and the training of 5) with training seeds 0 .. N-1 (stage names
get ``_seed<k>``, runs go to ``R/runs/seed<k>``, per-seed tables to ``R/table1/seed<k>``), and both merged tables give
the mean ± standard deviation over seeds of the per-seed means. ``--jobs J`` runs up to J stages at once, each as
soon as the stages it needs are done (a GPU has room for several of these small trainings).

Resumable: a finished stage leaves ``R/stages/<stage>.json`` and is skipped by the next run (delete that file, and
those of the stages that use its output, to redo it); a GAN stage interrupted mid-way continues from its last
training checkpoint; the report is rewritten by every run. Presets:

- ``smoke``: a few minutes on 2 CPU cores (tiny volumes and networks, two iterations per stage) -- for tests;
- ``cpu``: about two hours on 2 CPU cores (113 min measured on a shared machine; full-size phantoms, width 16, short
  schedules);
- ``gpu``: the study for one H100/H200 in about 10 minutes with ``--seeds 3`` (60 full-size phantoms made on all CPU
  cores, width 32, six stages at a time, the recommended model too, downstream U-Nets kept at their last epoch).
  Its schedules were set from the single-GPU iteration times measured before; it has not yet run on a GPU
  (docs/evaluation.md);
- ``paper``: the paper's hyper-parameters (width 64, batch 64, 100 GAN epochs, 30 segmenter epochs) -- for a GPU.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUNDLE = REPO / "bundle"
SCRIPTS = BUNDLE / "scripts"  # the bundle's command-line tools (phantom.py, prepare_datalist.py)
CONFIGS = BUNDLE / "configs"
if str(BUNDLE) not in sys.path:
    sys.path.insert(0, str(BUNDLE))

from scripts.runtime.conventions import VARIANTS  # noqa: E402
from scripts.runtime.conventions import VARIANT_NAMES  # noqa: E402
from scripts.runtime.files import write_json, write_text  # noqa: E402

#: Settings of each preset. ``*_epochs``/``*_epoch_length``: schedule of a stage (epoch_length None = whole epochs).
PRESETS = {
    "smoke": {
        "num_cases": 6, "shape": [96, 96, 40], "min_brain_pixels": 400, "features": 4, "seg_features": 4,
        "batch_size": 8, "seg_epochs": 1, "seg_epoch_length": 2, "gan_epochs": 1, "gan_epoch_length": 2,
        "down_epochs": 1, "down_epoch_length": 2, "val_num_cases": 1, "cache_num_workers": 0,
        "down_selection": "last", "recommended": False,
    },
    "cpu": {
        "num_cases": 24, "shape": [240, 240, 155], "min_brain_pixels": 2000, "features": 16, "seg_features": 16,
        "batch_size": 32, "seg_epochs": 12, "seg_epoch_length": None, "gan_epochs": 20, "gan_epoch_length": None,
        "down_epochs": 15, "down_epoch_length": None, "val_num_cases": 3, "cache_num_workers": 2,
        "down_selection": "best", "recommended": False,
    },
    "gpu": {
        "num_cases": 60, "shape": [240, 240, 155], "min_brain_pixels": 2000, "features": 32, "seg_features": 16,
        "batch_size": 64, "seg_epochs": 8, "seg_epoch_length": None, "gan_epochs": 6, "gan_epoch_length": None,
        "down_epochs": 6, "down_epoch_length": None, "val_num_cases": 6, "cache_num_workers": 4,
        "down_selection": "last", "recommended": True, "jobs": 6,
    },
    "paper": {
        "num_cases": 285, "shape": [240, 240, 155], "min_brain_pixels": 2000, "features": 64, "seg_features": 16,
        "batch_size": 64, "seg_epochs": 30, "seg_epoch_length": None, "gan_epochs": 100, "gan_epoch_length": None,
        "down_epochs": 30, "down_epoch_length": None, "val_num_cases": 4, "cache_num_workers": 4,
        "down_selection": "last", "recommended": False,
    },
}  # fmt: skip

#: Downstream segmenter inputs: run name -> (inputs, variant whose synthesis is used or None), in table order.
DOWNSTREAM = {
    "t2": ("t2", None),
    **{f"synth_{v}": ("synth", v) for v in VARIANTS},
    "real": ("real", None),
}
DOWNSTREAM_NAMES = {
    "t2": "T2 only",
    **{f"synth_{v}": f"T2 + {VARIANT_NAMES[v]} synthesised" for v in VARIANTS},
    "real": "4 real modalities",
}

#: The paper's Table 2 (BraTS 2018, whole-tumour Dice per slice; not comparable with phantom results).
PAPER_TABLE2 = {"T2 only": 0.738, "T2 + TC-MGAN synthesised": 0.759, "4 real modalities": 0.814}


#: overlays that stack on another overlay as well as on train.json
STACKED = {"train_downstream.json": ["train_segmenter.json"]}


def _bundle_cmd(config: str, **overrides) -> list[str]:
    """``python -m monai.bundle run`` of ``config``: ``train.json`` alone, any other config as an overlay on it (the
    model zoo's list form of ``--config_file``; ``train_downstream.json`` on ``train_segmenter.json`` too, see
    :data:`STACKED`); ``None`` overrides are left out."""
    files = [CONFIGS / "train.json"] + [CONFIGS / c for c in STACKED.get(config, [])]
    files += [CONFIGS / config] if config != "train.json" else []
    config_file = "[" + ",".join(f"'{f}'" for f in files) + "]" if len(files) > 1 else str(files[0])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(BUNDLE), "--config_file", config_file]
    for key, value in overrides.items():
        if value is None:
            continue
        cmd += [f"--{key}", json.dumps(value) if isinstance(value, (list, bool)) else str(value)]
    return cmd


def portable(cmd: list[str]) -> str:
    """A command as the records and ``results.md`` show it: ``python`` for this interpreter and paths relative to
    the repository root, so that it runs as written on another machine from the root of a clone."""
    root = str(REPO) + os.sep
    return shlex.join(["python" if c == sys.executable else c.replace(root, "") for c in cmd])


class Study:
    """The stages of one study (see the module doc) and the bookkeeping that makes it resumable."""

    def __init__(self, preset: str, output_dir: str, dataset_dir: str | None = None, device: str | None = None,
                 seeds: int = 1, jobs: int | None = None):  # fmt: skip
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ValueError(f"--seeds must be an integer >= 1, got {seeds!r}")
        jobs = PRESETS[preset].get("jobs", 1) if jobs is None else jobs
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"--jobs must be an integer >= 1, got {jobs!r}")
        self.preset, self.p = preset, PRESETS[preset]
        self.seeds, self.jobs = seeds, jobs
        self.started = time.time()
        self.variants = [*VARIANTS, *(["recommended"] if self.p.get("recommended") else [])]
        self.root = Path(output_dir).resolve()
        self.user_data = dataset_dir is not None
        self.data = Path(dataset_dir).resolve() if dataset_dir else self.root / "data"
        if self.user_data and not (self.data / "datalist.json").is_file():
            raise FileNotFoundError(
                f"{self.data / 'datalist.json'} not found: run "
                f"`python bundle/scripts/prepare_datalist.py --data_dir {self.data}` first"
            )
        self.device = device
        self.runs = self.root / "runs"
        for sub in ("logs", "stages", "runs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # --- seeds ------------------------------------------------------------------------------------------------------

    def tag(self, seed: int) -> str:
        """The suffix of a stage of training seed ``seed`` (none with a single seed: the layout of earlier studies)."""
        return "" if self.seeds == 1 else f"_seed{seed}"

    def runs_dir(self, seed: int) -> Path:
        return self.runs if self.seeds == 1 else self.runs / f"seed{seed}"

    def table1_dir(self, seed: int, variant: str) -> Path:
        return self.root / "table1" / (variant if self.seeds == 1 else f"seed{seed}/{variant}")

    # --- bookkeeping ------------------------------------------------------------------------------------------------

    def _marker(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    def done(self, stage: str) -> bool:
        return self._marker(stage).is_file()

    def record(self, stage: str, commands: list[list[str]], wall: float) -> None:
        info = {"stage": stage, "commands": [portable(c) for c in commands], "wall_s": round(wall, 1),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        write_json(str(self._marker(stage)), info, indent=2)

    def run_commands(self, stage: str, commands: list[list[str]]) -> None:
        """Run a stage's commands, output to the console and to ``logs/<stage>.log``; stop the study on a failure."""
        log = self.root / "logs" / f"{stage}.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BUNDLE), os.environ.get("PYTHONPATH", "")]))
        if self.jobs > 1:  # several stages at once: share the cores instead of each taking all of them
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.jobs)))
        with open(log, "a") as f:
            for cmd in commands:
                f.write(f"$ {shlex.join(cmd)}\n")
                f.flush()
                proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for line in proc.stdout:
                    f.write(line)
                    quiet = self.jobs > 1 or line.startswith(("Loading dataset", "monai.transforms")) or "it/s]" in line
                    if not quiet:  # several stages at once would interleave: their logs are in logs/
                        print(f"  {line.rstrip()}"[:200], flush=True)
                if proc.wait() != 0:
                    raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}); see {log}")

    def stage(self, name: str, commands, index: int, total: int) -> None:
        """Run one stage unless it is done. ``commands``: a list of command lists, or a callable doing the work."""
        if self.done(name) and name != "report":  # the report is cheap and always rewritten
            print(f"[{index}/{total}] {name}: done before, skipped ({self._marker(name)})", flush=True)
            return
        print(f"[{index}/{total}] {name} ...", flush=True)
        start = time.time()
        if callable(commands):
            commands = commands() or []
        else:
            self.run_commands(name, commands)
        self.record(name, commands, time.time() - start)
        print(f"[{index}/{total}] {name}: finished in {time.time() - start:.0f} s", flush=True)

    # --- the stages -------------------------------------------------------------------------------------------------

    def common(self) -> dict:
        return {"dataset_dir": str(self.data), "min_brain_pixels": self.p["min_brain_pixels"], "device": self.device}

    def training(self, seed: int = 0) -> dict:
        return {**self.common(), "output_dir": str(self.runs_dir(seed)),
                "cache_num_workers": self.p["cache_num_workers"], "val_num_cases": self.p["val_num_cases"],
                "batch_size": self.p["batch_size"], "cache_dir": str(self.root / "cache"),
                "seed": seed if self.seeds > 1 else None,
                # a stage that did not finish runs again from scratch: it replaces what the interrupted run left
                "overwrite": True}  # fmt: skip

    def phantom_commands(self) -> list[list[str]]:
        workers = ["--workers", "0"] if self.preset == "gpu" else []  # a GPU machine's CPU cores
        return [
            [sys.executable, str(SCRIPTS / "phantom.py"), "--output_dir", str(self.data), "--num_cases",
             str(self.p["num_cases"]), "--seed", "0", "--shape", json.dumps(self.p["shape"]), "--overwrite", "true",
             *workers],
            [sys.executable, str(SCRIPTS / "prepare_datalist.py"), "--data_dir", str(self.data)],
        ]  # fmt: skip

    def segmenter_commands(self, seed: int = 0) -> list[list[str]]:
        return [_bundle_cmd("train_segmenter.json", **self.training(seed), features=self.p["seg_features"],
                            max_epochs=self.p["seg_epochs"], epoch_length=self.p["seg_epoch_length"])]  # fmt: skip

    def gan_commands(self, variant: str, seed: int = 0) -> list[list[str]]:
        runs = self.runs_dir(seed)
        resume = (runs / variant / "checkpoint.pt").is_file()  # an interrupted run continues where it stopped
        config = "recommended.json" if variant == "recommended" else "train.json"
        return [_bundle_cmd(
            config, **self.training(seed), variant="tcmgan" if variant == "recommended" else variant,
            features=self.p["features"], max_epochs=self.p["gan_epochs"], epoch_length=self.p["gan_epoch_length"],
            segmenter_ckpt=str(runs / "segmenter" / "model.pt"), resume=resume or None,
        )]  # fmt: skip

    def table1_commands(self, variant: str, seed: int = 0) -> list[list[str]]:
        return [_bundle_cmd(
            "evaluate.json", **self.common(), ckpt_path=str(self.runs_dir(seed) / variant / "model.pt"),
            output_dir=str(self.table1_dir(seed, variant)), baselines=variant == VARIANTS[0],
        )]  # fmt: skip

    def downstream_commands(self, run: str, seed: int = 0) -> list[list[str]]:
        inputs, variant = DOWNSTREAM[run]
        runs = self.runs_dir(seed)
        synth = str(runs / variant / "model.pt") if variant else None
        return [
            _bundle_cmd("train_downstream.json", **self.training(seed), inputs=inputs, synth_ckpt=synth,
                        run_name=run, features=16 if self.preset != "smoke" else 4, max_epochs=self.p["down_epochs"],
                        epoch_length=self.p["down_epoch_length"], model_selection=self.p["down_selection"]),
            _bundle_cmd("evaluate_downstream.json", **self.common(), output_dir=str(runs), run_name=run),
        ]  # fmt: skip

    def seed_note(self) -> str:
        if self.seeds == 1:
            return ""
        return (f"**{self.seeds} training seeds**: every cell is the mean ± the standard deviation *over seeds* of "
                "the per-seed means (the per-seed tables, whose ± are over cases or slices, are in the seed "
                "folders).")  # fmt: skip

    def merge_table1(self):
        from scripts.runtime.evaluation import write_table1
        from scripts.runtime.metrics import merge_over_seeds

        per_variant = []
        for v in self.variants:
            summaries = [json.loads((self.table1_dir(k, v) / "scores.json").read_text()) for k in range(self.seeds)]
            per_variant.append(merge_over_seeds(summaries) if self.seeds > 1 else summaries[0])
        write_table1(per_variant, str(self.root / "table1"), note=self.seed_note())

    def merge_table2(self):
        from scripts.runtime.downstream import sanity_check, write_table2
        from scripts.runtime.metrics import merge_over_seeds

        rows = {}
        for r in DOWNSTREAM:
            summaries = [json.loads((self.runs_dir(k) / "downstream" / r / "scores.json").read_text())
                         for k in range(self.seeds)]  # fmt: skip
            rows[DOWNSTREAM_NAMES[r]] = merge_over_seeds(summaries) if self.seeds > 1 else summaries[0]
        _, sentence = sanity_check(rows[DOWNSTREAM_NAMES["t2"]], rows[DOWNSTREAM_NAMES["real"]])
        write_table2(rows, str(self.root / "table2"), note=self.seed_note(), footer=sentence)

    def plan(self) -> list[tuple[str, object, list[str]]]:
        """The stages in a runnable order, each ``(name, commands or callable, names of the stages it needs)``."""
        data = [] if self.user_data else ["phantoms"]
        stages: list[tuple[str, object, list[str]]] = []
        if not self.user_data:
            stages.append(("phantoms", self.phantom_commands(), []))
        for k in range(self.seeds):
            t = self.tag(k)
            stages.append((f"segmenter{t}", self.segmenter_commands(k), data))
            for v in self.variants:
                needs = [f"segmenter{t}"] if v in ("tcmgan", "tcmgan_bw", "recommended") else data
                gan = lambda v=v, k=k: self._run(f"gan_{v}{self.tag(k)}", self.gan_commands(v, k))  # noqa: E731
                stages.append((f"gan_{v}{t}", gan, needs))
            stages += [(f"table1_{v}{t}", self.table1_commands(v, k), [f"gan_{v}{t}"]) for v in self.variants]
        stages.append(("table1", lambda: self.merge_table1(), [n for n, _, _ in stages if n.startswith("table1_")]))
        for k in range(self.seeds):
            t = self.tag(k)
            for r, (_, variant) in DOWNSTREAM.items():
                stages.append((f"seg_{r}{t}", self.downstream_commands(r, k), [f"gan_{variant}{t}"] if variant else data))
        stages.append(("table2", lambda: self.merge_table2(), [n for n, _, _ in stages if n.startswith("seg_")]))
        stages.append(("report", lambda: self.report(), ["table1", "table2"]))
        return stages

    def _run(self, stage: str, commands: list[list[str]]) -> list[list[str]]:
        self.run_commands(stage, commands)  # commands built when the stage starts (the resume flag depends on it)
        return commands

    def run(self) -> Path:
        print(f"reproduce: preset {self.preset}, output {self.root}, data {self.data}, {self.seeds} seed(s), "
              f"{self.jobs} stage(s) at a time", flush=True)  # fmt: skip
        start = self.started = time.time()
        stages = self.plan()
        if self.jobs == 1:
            for i, (name, commands, _) in enumerate(stages, start=1):
                self.stage(name, commands, i, len(stages))
        else:
            self._run_parallel(stages)
        print(f"reproduce: all {len(stages)} stages done ({time.time() - start:.0f} s this run); "
              f"results in {self.root / 'results.md'}", flush=True)  # fmt: skip
        return self.root / "results.md"

    def _run_parallel(self, stages: list[tuple[str, object, list[str]]]) -> None:
        """Run up to ``jobs`` stages at once, each as soon as the stages it needs are finished; the first failure
        stops the study once the running stages end (their markers are written, so a rerun resumes)."""
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        index = {name: i for i, (name, _, _) in enumerate(stages, start=1)}
        pending = {name: (commands, needs) for name, commands, needs in stages}
        finished: set[str] = set()
        running: dict = {}
        with ThreadPoolExecutor(self.jobs) as pool:
            while pending or running:
                ready = [n for n, (_, needs) in pending.items() if all(d in finished for d in needs)]
                for name in ready[: self.jobs - len(running)]:
                    commands, _ = pending.pop(name)
                    running[pool.submit(self.stage, name, commands, index[name], len(stages))] = name
                if not running:
                    raise RuntimeError(f"stages {sorted(pending)} wait for stages that never run")
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    name = running.pop(future)
                    if future.exception() is not None:
                        pending.clear()  # start nothing more; let the running stages finish
                        wait(running)
                        raise future.exception()
                    finished.add(name)

    # --- the report -------------------------------------------------------------------------------------------------

    def report(self) -> list:
        from figures import comparison_figure

        examples = {v: str(self.table1_dir(0, v) / "examples.npz") for v in self.variants}
        names = {**VARIANT_NAMES, "recommended": "recommended"}
        figure = comparison_figure(examples, str(self.root / "figure3.png"), names=names)
        write_text(str(self.root / "results.md"), self.results_markdown(Path(figure).name))
        return []

    def results_markdown(self, figure: str) -> str:
        import monai
        import torch

        stages = [json.loads(p.read_text()) for p in sorted((self.root / "stages").glob("*.json"))]
        order = {name: i for i, (name, _, _) in enumerate(self.plan())}
        stages.sort(key=lambda s: order.get(s["stage"], len(order)))
        device = self.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        lines = [
            f"# Reproduction of TC-MGAN (preset `{self.preset}`)", "",
            f"Data: {'user data set ' + str(self.data) if self.user_data else 'phantom set made by the study'}; "
            f"splits from `{self.data / 'datalist.json'}`.", "",
            "Command:", "", f"    python tools/reproduce.py --preset {self.preset} --output_dir {self.root}"
            + (f" --dataset_dir {self.data}" if self.user_data else ""), "",
            "## Settings", "", "```json", json.dumps(self.p, indent=1), "```", "",
            f"Versions: Python {platform.python_version()}, torch {torch.__version__}, MONAI {monai.__version__}; "
            f"machine {platform.machine()}, {os.cpu_count()} CPUs, device {device}, GPU {gpu}.", "",
            "## Segmenter S (the frozen tumour segmenter of TC-MGAN)", "", self.segmenter_summary(), "",
            "## Table 1: synthesis quality (test split)", "", (self.root / "table1" / "table1.md").read_text(), "",
            "## Table 2: downstream tumour segmentation (test split)", "",
            (self.root / "table2" / "table2.md").read_text(), "",
            "The paper's Table 2 (BraTS 2018, reference per-slice whole-tumour Dice; not comparable with phantom "
            "results): " + ", ".join(f"{k} {v:.3f}" for k, v in PAPER_TABLE2.items()) + ".", "",
            "## Figure", "", f"![T2, each method's synthesis and the real image, tumour contour]({figure})", "",
            "## Stages", "", "| stage | wall time (s) | commands |", "|---|---|---|",
        ]  # fmt: skip
        for s in stages:
            cmds = "<br>".join(f"`{c}`" for c in s["commands"]) or "(in-process)"
            lines.append(f"| {s['stage']} | {s['wall_s']} | {cmds} |")
        total = sum(s["wall_s"] for s in stages)
        lines += ["", f"Total wall time of the recorded stages: {total:.0f} s ({total / 60:.1f} min)"
                  + (f"; they ran {self.jobs} at a time, and this run took {time.time() - self.started:.0f} s up to "
                     "this report" if self.jobs > 1 else "") + ".", ""]  # fmt: skip
        return "\n".join(lines)

    def segmenter_summary(self) -> str:
        """S's validation Dice (``validation.json`` of each seed's segmenter run): last and best epoch."""
        import numpy as np

        last, best = [], []
        for k in range(self.seeds):
            path = self.runs_dir(k) / "segmenter" / "validation.json"
            if not path.is_file():
                return f"No validation record at `{path}` (a run from before the bundle kept one)."
            record = json.loads(path.read_text())
            key = record["key_metric"]
            last.append(record["last"].get(key, float("nan")))
            best.append((record.get("best") or {}).get(key, float("nan")))  # no finite value: no best

        def cell(values):
            return f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f} over {len(values)} seeds"
                                               if len(values) > 1 else "")  # fmt: skip

        return (f"Validation Dice (`{key}`, on the first {self.p['val_num_cases']} `seg` cases) at the last epoch "
                f"{cell(last)}, at its best epoch {cell(best)}; `model.pt` holds the best epoch.")


def main(preset: str = "smoke", output_dir: str = "runs/reproduce", dataset_dir: str | None = None,
         device: str | None = None, seeds: int = 1, jobs: int | None = None) -> str:  # fmt: skip
    """Run (or resume) the study; returns the path of ``results.md``. See the module doc.

    Args:
        preset: ``smoke``, ``cpu``, ``gpu`` or ``paper``.
        output_dir: the study's folder (resumed when it holds finished stages).
        dataset_dir: a data folder with ``datalist.json`` instead of the study's phantoms.
        device: e.g. ``cpu`` or ``cuda:0`` (default: the GPU when there is one).
        seeds: training seeds (0 .. seeds-1) of the stochastic stages (segmenter, GANs, downstream U-Nets); both
            tables give mean ± std over seeds when more than one.
        jobs: stages run at once (default: the preset's; 6 for ``gpu``, 1 otherwise), each when the stages it
            needs are done.
    """
    return str(Study(preset, output_dir, dataset_dir, device, seeds, jobs).run())


if __name__ == "__main__":
    from scripts.runtime.command_line import run_tool

    run_tool(main)

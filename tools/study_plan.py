"""The plan of the paper's study (``reproduce.py``): the presets, and for one preset the stages in a runnable order,
each with the bundle commands it runs and the stages it needs. It runs nothing itself (``study_stages``) and
writes no report (``study_report``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from study_stages import BUNDLE, Later, Stage

from scripts.runtime.conventions import VARIANT_NAMES, VARIANTS

SCRIPTS = BUNDLE / "scripts"  # the bundle's command-line tools (phantom.py, prepare_datalist.py)
CONFIGS = BUNDLE / "configs"

#: Settings of each preset. ``*_epochs``/``*_epoch_length``: schedule of a stage (epoch_length None = whole epochs);
#: ``gan_batch_size``: the GAN stages' batch (default ``batch_size``); ``variants``: the paper's variants trained
#: (default all four); ``seeds``: the default of ``--seeds``.
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
    # the two claims with 3 seeds (two sessions on 2 cores): the variants they compare, each GAN about 1,000
    # iterations at batch 16 (15 epochs of the 24-case set; 264 iterations at batch 32 left every variant at slice SSIM
    # 0.13-0.15), 74 min for seed 0 on 2 cores; only the TC-MGAN synthesis gets a downstream U-Net, the one claim 2
    # needs
    "cpu_seeds": {
        "num_cases": 24, "shape": [240, 240, 155], "min_brain_pixels": 2000, "features": 16, "seg_features": 16,
        "batch_size": 32, "gan_batch_size": 16, "seg_epochs": 6, "seg_epoch_length": None, "gan_epochs": 15,
        "gan_epoch_length": None,
        "down_epochs": 8, "down_epoch_length": None, "val_num_cases": 3, "cache_num_workers": 2,
        "down_selection": "best", "recommended": False, "variants": ["mgan", "tcmgan", "tcmgan_bw"], "seeds": 3,
        "downstream_variants": ["tcmgan"],
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

#: overlays that stack on another overlay as well as on train.json
STACKED = {"train_downstream.json": ["train_segmenter.json"]}


def bundle_cmd(config: str, **overrides) -> list[str]:
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


def downstream_runs(variants) -> dict:
    """Downstream segmenter inputs: run name -> (inputs, variant whose synthesis is used or None), in table order."""
    return {"t2": ("t2", None), **{f"synth_{v}": ("synth", v) for v in variants}, "real": ("real", None)}


def downstream_name(run: str) -> str:
    """A downstream run's row in Table 2."""
    if run.startswith("synth_"):
        return f"T2 + {VARIANT_NAMES[run[len('synth_'):]]} synthesised"
    return {"t2": "T2 only", "real": "4 real modalities"}[run]


#: Downstream runs of a study that trains all four variants.
DOWNSTREAM = downstream_runs(VARIANTS)


class StudyPlan:
    """The stages of one study: where each writes (``runs/``, ``table1/``, per seed when more than one), the bundle
    command of each, and what each needs. ``seeds`` None: the preset's (1 unless it says otherwise)."""

    def __init__(self, preset: str, output_dir: str, dataset_dir: str | None = None, device: str | None = None,
                 seeds: int | None = None):  # fmt: skip
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        self.preset, self.p = preset, PRESETS[preset]
        seeds = self.p.get("seeds", 1) if seeds is None else seeds
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ValueError(f"--seeds must be an integer >= 1, got {seeds!r}")
        self.seeds = seeds
        self.paper_variants = list(self.p.get("variants", VARIANTS))
        self.variants = [*self.paper_variants, *(["recommended"] if self.p.get("recommended") else [])]
        self.downstream = downstream_runs(self.p.get("downstream_variants", self.paper_variants))
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

    # --- where each seed's outputs go ---------------------------------------------------------------------------------

    def tag(self, seed: int) -> str:
        """The suffix of a stage of training seed ``seed`` (none with a single seed: the layout of earlier studies)."""
        return "" if self.seeds == 1 else f"_seed{seed}"

    def runs_dir(self, seed: int) -> Path:
        return self.runs if self.seeds == 1 else self.runs / f"seed{seed}"

    def table1_dir(self, seed: int, variant: str) -> Path:
        return self.root / "table1" / (variant if self.seeds == 1 else f"seed{seed}/{variant}")

    # --- the commands -------------------------------------------------------------------------------------------------

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
        return [bundle_cmd("train_segmenter.json", **self.training(seed), features=self.p["seg_features"],
                           max_epochs=self.p["seg_epochs"], epoch_length=self.p["seg_epoch_length"])]  # fmt: skip

    def gan_commands(self, variant: str, seed: int = 0) -> list[list[str]]:
        runs = self.runs_dir(seed)
        resume = (runs / variant / "checkpoint.pt").is_file()  # an interrupted run continues where it stopped
        config = "recommended.json" if variant == "recommended" else "train.json"
        training = {**self.training(seed), "batch_size": self.p.get("gan_batch_size", self.p["batch_size"])}
        return [bundle_cmd(
            config, **training, variant="tcmgan" if variant == "recommended" else variant,
            features=self.p["features"], max_epochs=self.p["gan_epochs"], epoch_length=self.p["gan_epoch_length"],
            segmenter_ckpt=str(runs / "segmenter" / "model.pt"), resume=resume or None,
        )]  # fmt: skip

    def table1_commands(self, variant: str, seed: int = 0) -> list[list[str]]:
        return [bundle_cmd(
            "evaluate.json", **self.common(), ckpt_path=str(self.runs_dir(seed) / variant / "model.pt"),
            output_dir=str(self.table1_dir(seed, variant)), baselines=variant == self.variants[0],
        )]  # fmt: skip

    def downstream_commands(self, run: str, seed: int = 0) -> list[list[str]]:
        inputs, variant = self.downstream[run]
        runs = self.runs_dir(seed)
        synth = str(runs / variant / "model.pt") if variant else None
        return [
            bundle_cmd("train_downstream.json", **self.training(seed), inputs=inputs, synth_ckpt=synth,
                       run_name=run, features=16 if self.preset != "smoke" else 4, max_epochs=self.p["down_epochs"],
                       epoch_length=self.p["down_epoch_length"], model_selection=self.p["down_selection"]),
            bundle_cmd("evaluate_downstream.json", **self.common(), output_dir=str(runs), run_name=run),
        ]  # fmt: skip

    # --- the stages ---------------------------------------------------------------------------------------------------

    def stages(self, merge_table1, merge_table2, report) -> list[Stage]:
        """The stages in a runnable order; ``merge_table1``, ``merge_table2`` and ``report`` are the in-process
        stages (callables, from ``study_report``)."""
        data = [] if self.user_data else ["phantoms"]
        stages: list[Stage] = []
        if not self.user_data:
            stages.append(("phantoms", self.phantom_commands(), []))
        for k in range(self.seeds):  # seed by seed, so that a study cut short holds whole seeds
            t = self.tag(k)
            stages.append((f"segmenter{t}", self.segmenter_commands(k), data))
            for v in self.variants:
                needs = [f"segmenter{t}"] if v in ("tcmgan", "tcmgan_bw", "recommended") else data
                stages.append((f"gan_{v}{t}", Later(lambda v=v, k=k: self.gan_commands(v, k)), needs))
            stages += [(f"table1_{v}{t}", self.table1_commands(v, k), [f"gan_{v}{t}"]) for v in self.variants]
            for r, (_, variant) in self.downstream.items():
                stages.append((f"seg_{r}{t}", self.downstream_commands(r, k), [f"gan_{variant}{t}"] if variant else data))
        stages.append(("table1", merge_table1, [n for n, _, _ in stages if n.startswith("table1_")]))
        stages.append(("table2", merge_table2, [n for n, _, _ in stages if n.startswith("seg_")]))
        stages.append(("report", report, ["table1", "table2"]))
        return stages

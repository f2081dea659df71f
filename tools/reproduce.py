"""Run the paper's whole study in order and write ``R/results.md``: Table 1, Table 2 and a Fig. 3-like figure.

    python tools/reproduce.py --preset smoke|cpu|cpu_seeds|gpu|paper --output_dir R [--dataset_dir D] [--device cpu]
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
6. ``report``: the figure, ``R/claims.json`` and ``R/results.md`` (tables, the answers to the paper's two claims:
   paired differences across seeds with their 95 % intervals, sign tests and verdicts; commands, versions, preset,
   wall time per stage).

The pieces: ``study_plan.py`` (presets, the stages and their commands), ``study_stages.py`` (running them,
resumably, one or several at a time), ``study_report.py`` (tables, claims, ``results.md``); this file joins them.

``--seeds N`` repeats the stochastic stages (2, 3 and the training of 5) with training seeds 0 .. N-1 (stage names
get ``_seed<k>``, runs go to ``R/runs/seed<k>``, per-seed tables to ``R/table1/seed<k>``), and both merged tables give
the mean ± standard deviation over seeds of the per-seed means. ``--jobs J`` runs up to J stages at once, each as
soon as the stages it needs are done (a GPU has room for several of these small trainings).

Resumable: a finished stage leaves ``R/stages/<stage>.json`` and is skipped by the next run (delete that file, and
those of the stages that use its output, to redo it); a GAN stage interrupted mid-way continues from its last
training checkpoint; the merged tables and the report are rewritten by every run. ``--keep_to K`` runs nothing and
copies what the report is made from (no model) to ``K``; copied back into a study folder on another machine, the
study resumes there.
Presets:

- ``smoke``: a few minutes on 2 CPU cores (tiny volumes and networks, two iterations per stage) -- for tests;
- ``cpu``: about two hours on 2 CPU cores (113 min measured on a shared machine; full-size phantoms, width 16, short
  schedules);
- ``cpu_seeds``: the paper's two claims with 3 seeds (MGAN, TC-MGAN, TC-MGAN bw; each GAN about 1,000 iterations at
  batch 16): 74 min per seed on 2 CPU cores (measured, docs/results_cpu_seeds.md), so two sessions with ``--keep_to``;
- ``gpu``: the study for one H100/H200 in about 10 minutes with ``--seeds 3`` (60 full-size phantoms made on all CPU
  cores, width 32, six stages at a time, the recommended model too, downstream U-Nets kept at their last epoch).
  Its schedules were set from the single-GPU iteration times measured before; it has not yet run on a GPU
  (docs/evaluation.md);
- ``paper``: the paper's hyper-parameters (width 64, batch 64, 100 GAN epochs, 30 segmenter epochs) -- for a GPU.
"""

from __future__ import annotations

import time
from pathlib import Path

from study_plan import DOWNSTREAM, PRESETS, StudyPlan, bundle_cmd  # noqa: F401  (the study's vocabulary, re-exported)
from study_stages import StageRunner

import study_report
from scripts.runtime.conventions import VARIANTS  # noqa: F401


#: what ``--keep_to`` keeps of a study (globs under its folder): everything the report reads, no model
KEPT = ("table1/**/scores.json", "table1/*/examples.npz", "table1/seed0/*/examples.npz", "runs/**/scores.json",
        "runs/**/validation.json")  # the figure shows seed 0's examples


class Study(StudyPlan):
    """One study: its plan (:class:`study_plan.StudyPlan`), run by a :class:`study_stages.StageRunner` under the
    same folder (``jobs`` at a time; default the preset's), reported by ``study_report``."""

    def __init__(self, preset: str, output_dir: str, dataset_dir: str | None = None, device: str | None = None,
                 seeds: int | None = None, jobs: int | None = None):  # fmt: skip
        super().__init__(preset, output_dir, dataset_dir, device, seeds)
        # the merged tables and the report, cheap, are redone by every run: a run with more seeds than the last
        self.runner = StageRunner(self.root, PRESETS[preset].get("jobs", 1) if jobs is None else jobs,
                                  always=("table1", "table2", "report"))
        self.jobs = self.runner.jobs
        self.runs.mkdir(parents=True, exist_ok=True)

    def plan(self):
        """The stages in a runnable order, each ``(name, work, names of the stages it needs)``."""
        order: list[str] = []
        stages = self.stages(lambda: study_report.merge_table1(self), lambda: study_report.merge_table2(self),
                             lambda: study_report.report(self, self.runner, order))  # fmt: skip
        order += [name for name, _, _ in stages]
        return stages

    def run(self):
        print(f"reproduce: preset {self.preset}, output {self.root}, data {self.data}, {self.seeds} seed(s), "
              f"{self.jobs} stage(s) at a time", flush=True)  # fmt: skip
        stages = self.plan()
        self.runner.run(stages)
        print(f"reproduce: all {len(stages)} stages done ({time.time() - self.runner.started:.0f} s this run); "
              f"results in {self.root / 'results.md'}", flush=True)  # fmt: skip
        return self.root / "results.md"


def main(preset: str = "smoke", output_dir: str = "runs/reproduce", dataset_dir: str | None = None,
         device: str | None = None, seeds: int | None = None, jobs: int | None = None,
         keep_to: str | None = None) -> str:  # fmt: skip
    """Run (or resume) the study; returns the path of ``results.md``. See the module doc.

    Args:
        preset: ``smoke``, ``cpu``, ``cpu_seeds``, ``gpu`` or ``paper``.
        output_dir: the study's folder (resumed when it holds finished stages).
        dataset_dir: a data folder with ``datalist.json`` instead of the study's phantoms.
        device: e.g. ``cpu`` or ``cuda:0`` (default: the GPU when there is one).
        seeds: training seeds (0 .. seeds-1) of the stochastic stages (segmenter, GANs, downstream U-Nets); both
            tables give mean ± std over seeds when more than one, and the claims are answered across them
            (default: the preset's; 3 for ``cpu_seeds``, 1 otherwise).
        jobs: stages run at once (default: the preset's; 6 for ``gpu``, 1 otherwise), each when the stages it
            needs are done.
        keep_to: run nothing; copy what the report is made from (:data:`KEPT`: scores, validation curves, the
            figure's examples, the finished stages' records; no model) to this folder, for a study that must
            outlive its machine. Copied back into ``output_dir`` (``cp -r KEEP/. R/``), the study resumes there:
            the phantoms are made again (the same ones: seed 0), the kept stages are skipped.
    """
    study = Study(preset, output_dir, dataset_dir, device, seeds, jobs)
    if keep_to is not None:
        copied = study.runner.keep(Path(keep_to), KEPT, redo=("phantoms", "table1", "table2", "report"))
        print(f"reproduce: kept {len(copied)} files of {study.root} in {keep_to}", flush=True)
        return keep_to
    return str(study.run())


if __name__ == "__main__":
    from scripts.runtime.command_line import run_tool

    run_tool(main)

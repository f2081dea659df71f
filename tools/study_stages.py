"""The stage runner of a study (``reproduce.py``): each stage a list of commands or a function, run in a
dependency order one at a time or several at once, its output logged to ``R/logs/<stage>.log``, and a finished
stage recorded in ``R/stages/<stage>.json`` (commands, wall time) so that the next run skips it.

It knows nothing of what the stages do: the plan is ``study_plan.StudyPlan.stages``, the report
``study_report``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUNDLE = REPO / "bundle"
if str(BUNDLE) not in sys.path:
    sys.path.insert(0, str(BUNDLE))

from scripts.runtime.files import write_json  # noqa: E402

#: A stage: ``(name, work, names of the stages it needs)``; ``work`` is a list of commands, :class:`Later`, or a
#: callable doing the work in-process and returning the commands it ran (usually none).
Stage = tuple[str, object, list[str]]


class Later:
    """A stage's commands built when the stage starts (``build()``), not when the plan is made: e.g. a GAN's
    ``--resume`` flag, which depends on the checkpoint an interrupted run left."""

    def __init__(self, build):
        self.build = build


def portable(cmd: list[str]) -> str:
    """A command as the records and ``results.md`` show it: ``python`` for this interpreter and paths relative to
    the repository root, so that it runs as written on another machine from the root of a clone."""
    root = str(REPO) + os.sep
    return shlex.join(["python" if c == sys.executable else c.replace(root, "") for c in cmd])


class StageRunner:
    """Runs the stages of a plan under ``root`` (``logs/``, ``stages/``), ``jobs`` at a time; ``always``: stages
    run even when recorded as done (a cheap report that every run rewrites)."""

    def __init__(self, root: Path, jobs: int = 1, always: tuple[str, ...] = ("report",)):
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"--jobs must be an integer >= 1, got {jobs!r}")
        self.root, self.jobs, self.always = Path(root), jobs, always
        self.started = time.time()
        for sub in ("logs", "stages"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def marker(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    def done(self, stage: str) -> bool:
        return self.marker(stage).is_file()

    def record(self, stage: str, commands: list[list[str]], wall: float) -> None:
        info = {"stage": stage, "commands": [portable(c) for c in commands], "wall_s": round(wall, 1),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        write_json(str(self.marker(stage)), info, indent=2)

    def records(self) -> list[dict]:
        """The records of the finished stages (``stages/*.json``), loaded."""
        import json

        return [json.loads(p.read_text()) for p in sorted((self.root / "stages").glob("*.json"))]

    def keep(self, dest: Path, patterns: tuple[str, ...], redo: tuple[str, ...] = ()) -> list[Path]:
        """Copy the files matching ``patterns`` (globs under the root: what the report is made from, not the
        models) to ``dest`` in the same layout, with the records of the finished stages except those of ``redo``
        (stages whose outputs are not kept, such as the data). Copied back into a study folder, e.g. on a fresh
        machine, they let the study resume: the kept stages are skipped, ``redo`` and the unfinished ones run."""
        import shutil

        dest = Path(dest)
        files = {f for pattern in patterns for f in self.root.glob(pattern) if f.is_file()}
        files |= {self.marker(r["stage"]) for r in self.records() if r["stage"] not in redo}
        copied = []
        for f in sorted(files):
            target = dest / f.relative_to(self.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
            copied.append(target)
        return copied

    def run_commands(self, stage: str, commands: list[list[str]]) -> list[list[str]]:
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
        return commands

    def stage(self, name: str, commands, index: int, total: int) -> None:
        """Run one stage unless it is done. ``commands``: a list of command lists, :class:`Later`, or a callable
        doing the work and returning the commands it ran."""
        if self.done(name) and name not in self.always:
            print(f"[{index}/{total}] {name}: done before, skipped ({self.marker(name)})", flush=True)
            return
        print(f"[{index}/{total}] {name} ...", flush=True)
        start = time.time()
        if isinstance(commands, Later):
            commands = self.run_commands(name, commands.build())
        elif callable(commands):
            commands = commands() or []
        else:
            commands = self.run_commands(name, commands)
        self.record(name, commands, time.time() - start)
        print(f"[{index}/{total}] {name}: finished in {time.time() - start:.0f} s", flush=True)

    def run(self, stages: list[Stage]) -> None:
        """Every stage in ``stages`` (a runnable order), one at a time or ``jobs`` at once."""
        self.started = time.time()
        if self.jobs == 1:
            for i, (name, commands, _) in enumerate(stages, start=1):
                self.stage(name, commands, i, len(stages))
        else:
            self._run_parallel(stages)

    def _run_parallel(self, stages: list[Stage]) -> None:
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

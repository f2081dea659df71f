"""The runtime's imports go one way: each module of ``bundle/scripts/runtime`` imports on its own, and no module
reaches itself through the modules it imports (module-level or inside functions)."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import BUNDLE

RUNTIME = BUNDLE / "scripts" / "runtime"
MODULES = sorted(p.stem for p in RUNTIME.glob("*.py") if p.stem != "__init__")


def runtime_imports(module: str) -> set[str]:
    """The runtime modules ``module`` imports anywhere in its source (relative or ``scripts.runtime.x``)."""
    found = set()
    for node in ast.walk(ast.parse((RUNTIME / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                names = [node.module] if node.module else [a.name for a in node.names]
            elif (node.module or "").startswith("scripts.runtime."):
                names = [node.module[len("scripts.runtime."):]]
            elif node.module == "scripts.runtime":
                names = [a.name for a in node.names]
            else:
                names = []
        elif isinstance(node, ast.Import):
            names = [a.name[len("scripts.runtime."):] for a in node.names if a.name.startswith("scripts.runtime.")]
        else:
            continue
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in MODULES and n.split(".")[0] != module)
    return found


def find_circle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of ``graph`` (``[a, b, a]``), or ``[]``."""
    done, path = set(), []

    def visit(m):
        if m in path:
            return path[path.index(m):] + [m]
        if m in done:
            return []
        path.append(m)
        for n in sorted(graph.get(m, ())):
            found = visit(n)
            if found:
                return found
        path.pop()
        done.add(m)
        return []

    for m in sorted(graph):
        found = visit(m)
        if found:
            return found
    return []


def test_runtime_has_no_import_circle():
    graph = {m: runtime_imports(m) for m in MODULES}
    assert {"cases", "contrast"} <= graph["inference"] and "anymissing" not in graph["inference"]  # function-level too
    assert graph["evaluation"] >= {"cases", "downstream"}  # downstream imports inference: the old circle's path
    circle = find_circle(graph)
    assert not circle, "import circle: " + " -> ".join(circle)


def test_find_circle_finds_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


#: Run in one fresh interpreter: third-party packages imported once, then each runtime module imported alone in a
#: forked child (no module of the bundle loaded before it); prints the modules that fail, with the error.
_EACH_ALONE = """
import os, sys, traceback
import ignite, monai, nibabel, numpy, torch  # third-party, shared by every child
failed = []
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__("scripts.runtime." + module)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(module)
print("failed:", " ".join(failed))
"""


def test_each_runtime_module_imports_alone():
    done = subprocess.run([sys.executable, "-c", _EACH_ALONE, *MODULES], cwd=BUNDLE, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "failed:", done.stdout + done.stderr[-3000:]

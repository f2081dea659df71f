"""The docs carry no machine's paths: a command in them runs as written from the root of any clone."""

from __future__ import annotations

import re

from conftest import REPO

DOCS = sorted((REPO / "bundle" / "docs").glob("*.md")) + [REPO / "README.md"]
#: Paths that belong to one machine (its checkout, home, virtualenv); /data/... and /tmp/... are example placeholders.
MACHINE_PATH = re.compile(r"(/work/|/root/|/home/|/Users/|\.venv/bin/|" + re.escape(str(REPO)) + ")")


def test_no_doc_holds_a_path_of_a_particular_machine():
    found = [f"{doc.name}:{n}: {m.group(0)}" for doc in DOCS
             for n, line in enumerate(doc.read_text().splitlines(), 1) for m in [MACHINE_PATH.search(line)] if m]
    assert found == []


def test_no_doc_runs_an_overlay_alone():
    """Every workflow config other than train.json and inference.json is an overlay run in the list form."""
    alone = re.compile(r"--config_file\s+[\"']?(?!\[)[^\s\[]*configs/(?!train\.json|inference\.json|"
                       r"multi_gpu_inference\.json)\w+\.json")
    found = [f"{doc.name}:{n}" for doc in DOCS for n, line in enumerate(doc.read_text().splitlines(), 1)
             if alone.search(line)]
    assert found == []

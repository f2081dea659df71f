"""Gather per-run scores into the paper's tables (command-line tool; the configs write these tables themselves).

    python tools/tables.py write_table1 O1/scores.json O2/scores.json --output_dir O
    python tools/tables.py write_table2 --rows '{"T2 only": "O/downstream/t2/scores.json"}' --output_dir O
"""

from __future__ import annotations

import os
import sys

_BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
if _BUNDLE not in sys.path:  # a maintainer's tool beside the bundle: make the bundle folder importable
    sys.path.insert(0, _BUNDLE)

from scripts.runtime.downstream import write_table2  # noqa: E402
from scripts.runtime.evaluation import write_table1  # noqa: E402


def table1(*scores: str, output_dir: str) -> None:
    """Table 1 (PSNR/SSIM per target) from ``evaluate.json`` runs' ``scores.json`` files."""
    print(write_table1(list(scores), output_dir))


if __name__ == "__main__":
    from scripts.runtime.command_line import run_tool

    run_tool({"write_table1": table1, "write_table2": write_table2})

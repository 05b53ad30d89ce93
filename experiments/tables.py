"""Generate (or check) the tables of experiments/RESULTS.md from the committed result files.

    python experiments/tables.py            # rewrite the content between the markers from the files
    python experiments/tables.py --check    # exit 1 and print a diff when RESULTS.md differs from the files
    python experiments/tables.py --print mislabel_standard   # print one table
    python experiments/tables.py --sources  # which files each table reads

The engine (reading files, selecting a sweep's jobs by their overrides, formats, markers) is
experiments/tables_engine.py; the table specs are experiments/table_specs/<section>.py, one module per section of
RESULTS.md. Everything the engine and the specs define is importable from here (``TABLES``, ``render``,
``problems``, ``main``, ...).
"""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the engine and the specs beside this script

import table_specs  # noqa: E402
from tables_engine import *  # noqa: E402, F403
from tables_engine import load_specs, main  # noqa: E402

SECTIONS = load_specs(table_specs.MODULES)

if __name__ == "__main__":
    sys.exit(main(description=__doc__.split("\n\n")[0]))

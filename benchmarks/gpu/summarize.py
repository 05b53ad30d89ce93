"""Turn the files a GPU run brought back into committed results and the RESULTS.md section (issue #18).

    python benchmarks/gpu/summarize.py FETCHED [FETCHED ...] [--dest benchmarks/results/gpu]

Each FETCHED folder is one call's $OUT (bench.csv, env.json and, from run.sh, tests.log). Their bench.csv rows are
concatenated with a ``run`` column (1, 2, ... in the order given; a later call that repeats a measurement keeps
both rows), env.json of the first becomes DEST/env.json, the first tests.log and nvidia-smi.csv go to DEST too. Prints the table with
the ratios; with the default DEST it also regenerates RESULTS.md's tables (``experiments/tables.py``), whose
``gpu`` table reads DEST/bench.csv.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
DEST = ROOT / "benchmarks" / "results" / "gpu"
sys.path.insert(0, str(ROOT / "experiments"))

import tables  # noqa: E402
from table_specs.gpu import GPU_HEADER, gpu_rows  # noqa: E402


def merge(fetched: list[Path], dest: Path) -> pd.DataFrame:
    frames = []
    for i, d in enumerate(fetched, 1):
        df = pd.read_csv(d / "bench.csv")
        df.insert(0, "run", i)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    dest.mkdir(parents=True, exist_ok=True)
    out.to_csv(dest / "bench.csv", index=False)
    env = json.loads((fetched[0] / "env.json").read_text())
    env["runs"] = len(fetched)
    (dest / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    for name in ("tests.log", "nvidia-smi.csv"):  # from run.sh: the first call that wrote each
        found = [d / name for d in fetched if (d / name).exists()]
        if found:
            shutil.copyfile(found[0], dest / name)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fetched", nargs="+", type=Path)
    ap.add_argument("--dest", type=Path, default=DEST)
    a = ap.parse_args(argv)
    df = merge(a.fetched, a.dest)
    env = json.loads((a.dest / "env.json").read_text())
    print(f"{env['device']} (torch {env['torch']}), {len(df)} rows from {len(a.fetched)} run(s)\n")
    print(tables.Table("gpu", GPU_HEADER, gpu_rows(str(a.dest / "bench.csv"))).markdown())
    if a.dest.resolve() == DEST.resolve():
        tables.load.cache_clear()
        return tables.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())

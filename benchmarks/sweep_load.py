"""Load test of the sweep machinery (issue 32 item 5): a multirun of small jobs over 2 parallel joblib workers on one
shared cache, with worker processes SIGKILLed mid-job (seeded) and the same multirun command rerun until it
finishes (a requeue, as ``experiments/run_here.sh`` does until its ``.done``). Every job's results are then compared
with those of a serial run of the same jobs (the basic launcher, one process, its own fresh cache):

* metrics: every key of ``metrics.json`` except timings, memory and cache provenance (``time/*``, ``mem/*``,
  ``*_s``, ``*/cached``), equal bit for bit (NaN equals NaN), and the same set of keys;
* score and model files: every ``*.safetensors`` of the job directory, tensors bit-equal (dtype, shape, bytes);
* the shared cache: the same entries as the serial run's cache, each bit-equal, no snapshot left;
* stray files: no temporary file (``*.tmp``) anywhere in the cache or the sweep, no safetensors file that does not
  verify (:func:`influencelab.files.safetensors_problem` and its checksum), no cache entry without its record;
* lost jobs: every job directory present, every job finished (:func:`influencelab.sweeps.job_status`), and after
  each invocation ``influencelab-report`` (:func:`influencelab.load_sweep`'s ``error``) lists exactly the jobs left
  to do: those killed mid-job and those the stopped sweep never started.

    python benchmarks/sweep_load.py                      # 40 jobs, 4 kills (a few minutes on 2 CPU cores)
    python benchmarks/sweep_load.py --seeds 3 --solvers ekfac --kills 2 --out /tmp/x.csv   # 12 jobs

Writes ``benchmarks/results/sweep_load.csv`` (one row: jobs, kills, requeues, mismatches, stray files, wall times)
and ``sweep_load_rounds.csv`` beside it (one row per invocation of the multirun command: its exit status, wall time,
the killed worker's job, the jobs unfinished after it). Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: metrics that legitimately differ between runs: timings, memory, and whether a stage found its result cached
VOLATILE = re.compile(r"^(time|mem)/|_s$|/cached$|_cached$")


def job_overrides(seeds: int, solvers: list[str], n: int) -> list[str]:
    """The sweep: 2 models x ``seeds`` seeds x solvers x 2 dampings of tiny digits jobs. Consecutive jobs (the
    dampings, the solvers) share the trained model and the factors, so the 2 workers race on the same cache
    entries; snapshots after every batch and 4 score chunks per job give the kills many writes to land in."""
    return ["dataset=digits", f"dataset.subset={n}", "dataset.label_noise=0.1", "trainer.epochs=1",
            "trainer.batch_size=32", "logger=none", "query.n=8", "stages=[train,fit,self,pairwise,mislabel]",
            "fit.checkpoint_s=0", f"score.chunk_size={max(1, n // 4)}",
            "model=linear,mlp", f"seed={','.join(str(s) for s in range(seeds))}",
            f"solver={','.join(solvers)}", "solver.damping=1e-3,1e-1"]


def env_for(cache: Path) -> dict[str, str]:
    return {**os.environ, "INFLUENCELAB_CACHE": str(cache), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg", "INFLUENCELAB_PROGRESS_S": "0", "PYTHONHASHSEED": "0"}


def multirun(sweep: Path, overrides: list[str], parallel: int) -> list[str]:
    launcher = ["hydra/launcher=parallel", f"hydra.launcher.n_jobs={parallel}"] if parallel > 1 else []
    return [sys.executable, "-m", "influencelab", "-m", *launcher, *overrides, f"hydra.sweep.dir={sweep}"]


def loky_workers(parent: int) -> list:
    """The joblib (loky) worker processes under ``parent`` (not loky's resource tracker)."""
    import psutil

    try:
        kids = psutil.Process(parent).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in kids:
        try:
            if "popen_loky" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def current_job(worker, sweep: Path) -> str | None:
    """The job a worker is running: the job log (``<sweep>/<N>/influencelab.log``) it holds open."""
    import psutil

    try:
        for f in worker.open_files():
            p = Path(f.path)
            if p.name.endswith(".log") and p.parent.parent == sweep:
                return p.parent.name
    except psutil.Error:
        pass
    return None


def started_since(sweep: Path, t0: float) -> int:
    """Jobs whose ``.hydra/config.yaml`` was written at or after ``t0`` (started in this invocation)."""
    n = 0
    for cfg in sweep.glob("*/.hydra/config.yaml"):
        try:
            n += cfg.stat().st_mtime >= t0
        except FileNotFoundError:
            pass
    return n


def statuses(sweep: Path, n_jobs: int) -> dict[str, str]:
    """``job -> ok | incomplete | failed | missing`` for jobs 0..n_jobs-1."""
    from influencelab.sweeps import job_status

    out = {}
    for i in range(n_jobs):
        d = sweep / str(i)
        out[str(i)] = job_status(d)[0] if (d / ".hydra" / "config.yaml").exists() else "missing"
    return out


def flagged_by_report(sweep: Path) -> list[str]:
    """The jobs ``influencelab-report`` lists as failed or unfinished: those with an ``error`` in
    :func:`influencelab.load_sweep` (killed mid-job, or never started)."""
    from influencelab import load_sweep
    from influencelab.errors import InfluenceLabError

    try:
        df = load_sweep(sweep, by_damping=False, missing=None)
    except InfluenceLabError:  # no job directory yet
        return []
    return [str(j) for j, e in zip(df["job"], df["error"]) if e is not None]


def temp_files(*roots: Path, pids: set[int] | None = None) -> list[Path]:
    """``*.tmp`` files under ``roots`` (of the writers ``pids`` only: their names carry the writer's pid)."""
    out = []
    for root in roots:
        for d, _, names in os.walk(root):
            for n in names:
                if n.endswith(".tmp") and (pids is None or any(f"-{p}." in n for p in pids)):
                    out.append(Path(d) / n)
    return out


def kill_one(parent: int, sweep: Path, cache: Path, mode: str, rng: random.Random, wait_s: float = 20.0
             ) -> tuple[int | None, str | None, str | None, str]:
    """SIGKILL one busy worker of ``parent``: ``mode="job"`` a random one now; ``"write"``: the first caught
    writing a file (its temp file exists) within ``wait_s``, else a random one. Returns its pid, its job, the
    other worker's job, and how it was killed (``job``, ``mid-write <file>``)."""
    jobs: dict[int, str | None] = {}
    victim = None
    how = "job"
    if mode == "write":
        t_end, t_jobs = time.time() + wait_s, 0.0
        while time.time() < t_end and victim is None:
            workers = loky_workers(parent)
            if not workers:
                break
            if time.time() - t_jobs > 0.2:  # which job each worker runs (known before it dies)
                jobs.update({w.pid: current_job(w, sweep) for w in workers})
                t_jobs = time.time()
            by_pid = {w.pid: w for w in workers}
            for tmp in temp_files(cache, sweep, pids=set(by_pid)):
                pid = next(p for p in by_pid if f"-{p}." in tmp.name)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                where = f"cache/{tmp.relative_to(cache)}" if tmp.is_relative_to(cache) else tmp.relative_to(sweep)
                victim, how = by_pid[pid], f"mid-write {where}"
                break
            time.sleep(0.002)
    if victim is None:
        busy = [(w, current_job(w, sweep)) for w in loky_workers(parent)]
        busy = [(w, j) for w, j in busy if j is not None]
        if not busy:
            return None, None, None, ""
        victim, _ = busy[rng.randrange(len(busy))]
        jobs.update({w.pid: j for w, j in busy})
        try:
            os.kill(victim.pid, signal.SIGKILL)
        except ProcessLookupError:
            return None, None, None, ""
    others = [j for p, j in jobs.items() if p != victim.pid and j is not None]
    return victim.pid, jobs.get(victim.pid), (others[0] if others else None), how


def run_with_kills(sweep: Path, cache: Path, overrides: list[str], n_jobs: int, kills: int, seed: int,
                   workers: int, max_rounds: int, round_timeout: float, log_dir: Path,
                   write_kills: float = 0.5) -> tuple[list[dict], int]:
    """Run the parallel multirun, SIGKILLing one busy worker in each of the first ``kills`` invocations (after a
    seeded number of this invocation's jobs has started, plus a seeded delay; a fraction ``write_kills`` of them
    aimed at a worker caught writing a file), and rerun the same command until it exits 0. Returns a row per invocation and
    the number of SIGKILLs sent."""
    rng = random.Random(seed)
    rows, sent = [], 0
    for rnd in range(1, max_rounds + 1):
        before = statuses(sweep, n_jobs) if sweep.exists() else {str(i): "missing" for i in range(n_jobs)}
        done_before = sum(v == "ok" for v in before.values())
        kill = sent < kills
        # the kill lands after the k-th job of this invocation has started: past the jobs finished earlier (they
        # replay from the cache), so it hits a job computing
        k = rng.randint(min(done_before + 1, n_jobs - 1), max(min(done_before + 1, n_jobs - 1), n_jobs - 2))
        delay = rng.uniform(0.0, 1.5)
        # kill i aims at a write when floor((i + 1) f) > floor(i f): f = 0.5 alternates a random time and a write
        mode = "write" if math.floor((sent + 1) * write_kills) > math.floor(sent * write_kills) else "job"
        how = ""
        t0 = time.time()
        with open(log_dir / f"round{rnd}.log", "w") as logf:
            proc = subprocess.Popen(multirun(sweep, overrides, workers), cwd=REPO, env=env_for(cache),
                                    stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
            killed_pid = killed_job = other_job = None
            seen: dict[int, object] = {}
            while proc.poll() is None:
                seen.update({w.pid: w for w in loky_workers(proc.pid)})
                if time.time() - t0 > round_timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise SystemExit(f"round {rnd} ran over {round_timeout} s (see {log_dir}/round{rnd}.log)")
                if kill and killed_pid is None and started_since(sweep, t0) >= k:
                    time.sleep(delay)
                    killed_pid, killed_job, other_job, how = kill_one(proc.pid, sweep, cache, mode, rng)
                    sent += killed_pid is not None
                time.sleep(0.05)
            rc = proc.returncode
        wall = time.time() - t0
        # the pool's breakdown: does a worker of this invocation outlive it (still writing to the cache)?
        orphans = [w for w in seen.values() if w.is_running()]
        for w in orphans:  # wait for them, so that the next invocation starts alone
            try:
                w.wait(timeout=round_timeout)
            except Exception:  # noqa: BLE001 (psutil.TimeoutExpired: leave it, counted)
                pass
        after = statuses(sweep, n_jobs)
        flagged = flagged_by_report(sweep)
        rows.append({"round": rnd, "rc": rc, "wall_s": round(wall, 2), "killed_pid": killed_pid or "",
                     "kill": how, "killed_job": killed_job or "", "other_running_job": other_job or "",
                     "jobs_started": started_since(sweep, t0),
                     "workers_outliving_parent": len(orphans),
                     "ok_before": done_before, "ok_after": sum(v == "ok" for v in after.values()),
                     "incomplete_after": " ".join(j for j, v in after.items() if v == "incomplete"),
                     "missing_after": sum(v == "missing" for v in after.values()),
                     "failed_after": sum(v == "failed" for v in after.values()),
                     # what influencelab-report lists as failed or unfinished (load_sweep's error column)
                     "flagged_by_report": " ".join(flagged),
                     "report_lists_the_jobs_left": set(flagged) == {j for j, v in after.items() if v != "ok"},
                     # what the kills left for the next invocation to clear
                     "temp_files_after": len(temp_files(cache, sweep))})
        print(f"round {rnd}: exit {rc} in {wall:.1f} s, killed job {killed_job or '-'} (pid {killed_pid or '-'}"
              f"{', ' + how if how else ''}), {rows[-1]['ok_after']}/{n_jobs} jobs finished, "
              f"{rows[-1]['temp_files_after']} temp files left", flush=True)
        if rc == 0 and killed_pid is None:
            return rows, sent
    raise SystemExit(f"the sweep did not finish in {max_rounds} invocations")


# ---- comparisons ----------------------------------------------------------------------------------------------

def same_value(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def compare_metrics(a: Path, b: Path) -> list[str]:
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    ka, kb = ({k for k in m if not VOLATILE.search(k)} for m in (ma, mb))
    diffs = [f"{k}: only in {'parallel' if k in ka else 'serial'}" for k in sorted(ka ^ kb)]
    diffs += [f"{k}: {ma[k]!r} != {mb[k]!r}" for k in sorted(ka & kb) if not same_value(ma[k], mb[k])]
    return diffs


def tensors_of(path: Path) -> dict:
    from influencelab.files import read_tensors

    return read_tensors(path)[0]


def bits(t):
    """A tensor's raw bytes (bit-equality, NaN payloads included)."""
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else t


def compare_tensor_files(a: Path, b: Path) -> list[str]:
    """Every ``*.safetensors`` under ``a`` and ``b`` (relative paths), tensors bit-equal."""
    import torch

    fa = {p.relative_to(a) for p in a.rglob("*.safetensors")}
    fb = {p.relative_to(b) for p in b.rglob("*.safetensors")}
    diffs = [f"{p}: only in {'parallel' if p in fa else 'serial'}" for p in sorted(fa ^ fb)]
    for rel in sorted(fa & fb):
        ta, tb = tensors_of(a / rel), tensors_of(b / rel)
        if ta.keys() != tb.keys():
            diffs.append(f"{rel}: tensors {sorted(ta)} != {sorted(tb)}")
            continue
        for k in ta:
            x, y = ta[k], tb[k]
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(bits(x), bits(y)):
                err = (x.double() - y.double()).abs().max().item() if x.shape == y.shape and x.numel() else None
                diffs.append(f"{rel}[{k}]: differs (max abs diff {err})")
    return diffs


def stray_files(root: Path) -> list[str]:
    """Temporary files, safetensors files that do not verify, cache entries without their record (or a record
    without its tensors), and snapshots left under ``root``."""
    from influencelab.errors import InfluenceLabError
    from influencelab.files import safetensors_problem

    out = []
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root)
        if p.name.endswith(".tmp") or (p.name.startswith(".") and p.parent.name != ".hydra"):
            out.append(f"{rel}: temporary file")
        elif p.suffix == ".safetensors":
            problem = safetensors_problem(p)
            if problem is None:
                try:
                    tensors_of(p)
                except InfluenceLabError as e:
                    problem = str(e)
            if problem:
                out.append(f"{rel}: {problem}")
        if "snapshots" in rel.parts and not p.name.startswith("."):
            out.append(f"{rel}: snapshot left")
    return out


def cache_records_missing(cache: Path) -> list[str]:
    out = []
    for p in cache.rglob("*.safetensors"):
        if not p.with_suffix(".json").exists():
            out.append(f"{p.relative_to(cache)}: no .json record")
    for p in cache.rglob("*.json"):
        if not p.with_suffix(".safetensors").exists():
            out.append(f"{p.relative_to(cache)}: no tensors")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds per model (jobs = 2 x seeds x solvers x 2)")
    ap.add_argument("--solvers", default="ekfac,kfac")
    ap.add_argument("--n", type=int, default=200, help="training points per job (dataset.subset)")
    ap.add_argument("--kills", type=int, default=4, help="SIGKILLs of a busy worker (one per invocation)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="seeds which job each kill lands in and when")
    ap.add_argument("--write-kills", type=float, default=0.5,
                    help="fraction of the kills aimed at a worker caught writing a file (the rest: at a random time)")
    ap.add_argument("--max-rounds", type=int, default=0, help="invocations allowed (default kills + 3)")
    ap.add_argument("--round-timeout", type=float, default=900.0)
    ap.add_argument("--workdir", type=Path, default=None, help="kept after the run (default: a temp dir, removed)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "sweep_load.csv")
    args = ap.parse_args(argv)

    solvers = [s for s in args.solvers.split(",") if s]
    overrides = job_overrides(args.seeds, solvers, args.n)
    n_jobs = 2 * args.seeds * len(solvers) * 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sweep_load-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    ser_sweep, ser_cache = work / "serial" / "sweep", work / "serial" / "cache"
    par_sweep, par_cache = work / "parallel" / "sweep", work / "parallel" / "cache"
    for d in (ser_sweep, ser_cache, par_sweep, par_cache):
        shutil.rmtree(d, ignore_errors=True)

    print(f"{n_jobs} jobs: {' '.join(overrides)}", flush=True)
    t0 = time.time()
    with open(logs / "serial.log", "w") as logf:
        r = subprocess.run(multirun(ser_sweep, overrides, 1), cwd=REPO, env=env_for(ser_cache), stdout=logf,
                           stderr=subprocess.STDOUT)
    wall_serial = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"the serial run failed (exit {r.returncode}): see {logs / 'serial.log'}")
    print(f"serial: {n_jobs} jobs in {wall_serial:.1f} s", flush=True)

    rounds, sent = run_with_kills(par_sweep, par_cache, overrides, n_jobs, args.kills, args.seed, args.workers,
                                  args.max_rounds or args.kills + 3, args.round_timeout, logs, args.write_kills)

    # checks
    final = statuses(par_sweep, n_jobs)
    lost = [j for j, v in final.items() if v != "ok"]
    metric_diffs, file_diffs = [], []
    for i in range(n_jobs):
        a, b = par_sweep / str(i), ser_sweep / str(i)
        if (a / "metrics.json").exists():
            metric_diffs += [f"job {i}: {d}" for d in compare_metrics(a, b)]
            file_diffs += [f"job {i}: {d}" for d in compare_tensor_files(a, b)]
    cache_diffs = compare_tensor_files(par_cache, ser_cache)
    stray = [f"cache/{s}" for s in stray_files(par_cache) + cache_records_missing(par_cache)]
    stray += [f"sweep/{s}" for s in stray_files(par_sweep)]
    serial_stray = stray_files(ser_cache) + stray_files(ser_sweep)
    killed_jobs = [r["killed_job"] or "?" for r in rounds if r["killed_pid"] != ""]
    # after each invocation, the report lists exactly the jobs left to do (unfinished and never started)
    report_misses = sum(r["report_lists_the_jobs_left"] is False for r in rounds)
    requeued = sorted({int(j) for r in rounds[:-1] for j in r["incomplete_after"].split()})
    summary = {
        "date": datetime.now().isoformat(timespec="seconds"), "jobs": n_jobs, "workers": args.workers,
        "n_train": args.n, "solvers": "+".join(solvers), "seed": args.seed, "kills": sent,
        "killed_jobs": " ".join(killed_jobs),
        "kills_mid_write": sum(str(r["kill"]).startswith("mid-write") for r in rounds),
        "temp_files_left_by_kills": sum(r["temp_files_after"] for r in rounds[:-1]),
        "invocations": len(rounds), "requeues": len(rounds) - 1,
        "jobs_requeued_unfinished": len(requeued),
        "jobs_missing_after_kills": sum(r["missing_after"] for r in rounds[:-1]),
        "report_misses": report_misses, "lost_jobs": len(lost), "metric_mismatches": len(metric_diffs),
        "score_file_mismatches": len(file_diffs),
        "cache_mismatches": len(cache_diffs), "stray_files": len(stray), "serial_stray_files": len(serial_stray),
        "wall_serial_s": round(wall_serial, 1), "wall_parallel_s": round(sum(r["wall_s"] for r in rounds), 1),
        "wall_parallel_last_s": rounds[-1]["wall_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary))
        w.writeheader()
        w.writerow(summary)
    with open(args.out.with_name(args.out.stem + "_rounds.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rounds[0]))
        w.writeheader()
        w.writerows(rounds)
    problems = ([f"lost job {j} ({final[j]})" for j in lost]
                + [f"round {r['round']}: the report lists {r['flagged_by_report'] or 'no job'} as left to do"
                   for r in rounds if not r["report_lists_the_jobs_left"]] + metric_diffs + file_diffs
                + [f"cache {d}" for d in cache_diffs] + stray + [f"serial {s}" for s in serial_stray])
    for line in problems[:50]:
        print("  " + line)
    print(json.dumps(summary), flush=True)
    if args.workdir is None and not problems:
        shutil.rmtree(work, ignore_errors=True)
    elif problems:
        print(f"kept {work}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""Section 9 of RESULTS.md: EK-FAC-preconditioned CG and LiSSA (experiments/precond_spectrum.py; runs
ihvp_solvers, ihvp_precond, ihvp_precond_cg, ihvp_precond_lissa, unlearn_precond, ihvp_resnet18_pcg,
ihvp_resnet18_lissa_ekfac)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tables_engine import Cell, Job, Ref, Section, Sweep, cell, fmt, job, ref, timing

from table_specs.ihvp import against_valid, ihvp_ref, ihvp_rows, iters_cell, ref_state

SECTION = Section("9. EK-FAC-preconditioned CG and LiSSA")

# the spectrum of the EK-FAC-preconditioned damped system (experiments/precond_spectrum.py)
_SPEC = "experiments/results/precond_spectrum/spectrum.csv"


def _spec(key: str, model: str, n: int, lam: float, lam_p: float, pre: str = "ekfac", samples: int = 1) -> Ref:
    return ref(_SPEC, key, model=model, n_train=n, curvature="fisher", preconditioner=pre, fisher_samples=samples,
               damping=float(lam), precond_damping=float(lam_p))


def spec_row(model: str, n: int, lam: float) -> list[str | Cell]:
    same, big = (model, n, lam, lam), (model, n, lam, 10 * lam)
    return [f"{model}, n = {n}", f"{lam:g}", cell("{:e2}", _spec("cond_A", *same)),
            cell("{:e2} / {:e2}", _spec("cond_PA", *same), _spec("cond_PA", *big)),
            cell("{:e2}", _spec("cond_PA", *same, pre="kfac")),
            cell("{:d} / {:d} / {:d}", _spec("cg_iters_plain", *same), _spec("cg_iters_pcg", *same),
                 _spec("cg_iters_pcg", *big)),
            cell("{:d} / {:d}", _spec("cg_iters_pcg", *same, samples=16), _spec("cg_iters_pcg", *same, pre="kfac"))]


SECTION.table("precond_spectrum", ["model", "λ", "cond(G + λI)", "cond(P⁻¹(G + λI)), EK-FAC, λ_P = λ / 10λ",
                                   "… K-FAC, λ_P = λ", "CG iterations to 1e-6: plain / EK-FAC λ_P = λ / 10λ",
                                   "… EK-FAC 16 label samples / K-FAC"],
              [spec_row(m, n, lam) for m, n in (("mlp", 48), ("cnn", 48), ("mlp", 600), ("cnn", 600))
               for lam in (1e-3, 1e-2, 0.1, 1.0)],
              "9: condition numbers and CG iterations, plain vs EK-FAC/K-FAC-preconditioned, small float64 models")

# all six solvers across λ = 1e-5 … 10 on the CNN (run ihvp_solvers; one job per solver and damping)
_SIX = ["ekfac", "kfac", "lissa", "lissa_ekfac", "cg", "cg_ekfac"]
_SIX_NAMES = ["EK-FAC", "K-FAC", "LiSSA (depth 200)", "LiSSA + EK-FAC (depth 200)", "CG", "CG + EK-FAC"]
_SIX_DAMPINGS = ["1e-05", "0.0001", "0.001", "0.01", "0.1", "1.0", "10.0"]
SECTION.table("ihvp_solvers", ["λ", "CG reference (relative residual)", *(f"{n} error / cosine" for n in _SIX_NAMES)],
              ihvp_rows("ihvp_solvers", _SIX_DAMPINGS, _SIX, time_at="0.001"),
              "9: six solvers' IHVP error vs the CG reference, CNN")

SECTION.table("ihvp_solvers_iters", ["λ", *(f"{n}: iterations to error 0.1 / 0.01 (time to 0.1); final residual"
                                           for n in _SIX_NAMES[2:])],
              [[f"{float(lam):g}", *(iters_cell("ihvp_solvers", s, lam) for s in _SIX[2:])] for lam in _SIX_DAMPINGS],
              "9: iterations and time to an error of 0.1 / 0.01, and the final relative residual, iterative solvers")


def resnet_precond_row(lam: str) -> list[str | Cell]:
    """Reduced ResNet-18 at one damping: ihvp_resnet18's EK-FAC and LiSSA beside the preconditioned solvers of
    ihvp_resnet18_lissa_ekfac and ihvp_resnet18_pcg (same model and CG reference)."""
    def err(name: str, solver: str) -> Ref:
        return ihvp_ref(name, solver, lam, against_valid("ihvp/rel_error"))

    def its(name: str, solver: str) -> Cell:
        return iters_cell(name, solver, lam)

    return [f"{float(lam):g}", cell("{}", ihvp_ref("ihvp_resnet18", "ekfac", lam, ref_state)),
            cell("{:.3}", err("ihvp_resnet18", "ekfac")),
            cell("{:.3}", err("ihvp_resnet18", "lissa")), cell("{:.3}", err("ihvp_resnet18_lissa_ekfac", "lissa_ekfac")),
            its("ihvp_resnet18", "lissa"), its("ihvp_resnet18_lissa_ekfac", "lissa_ekfac"),
            its("ihvp_resnet18_pcg", "cg"), its("ihvp_resnet18_pcg", "cg_ekfac")]


SECTION.table("ihvp_resnet18_precond", ["λ", "CG reference (relative residual)", "EK-FAC error", "LiSSA error",
                                        "LiSSA + EK-FAC error",
                                        *(f"{n}: iterations to error 0.1 / 0.01 (time to 0.1); final residual"
                                          for n in ("LiSSA", "LiSSA + EK-FAC", "CG (≤ 100)", "CG + EK-FAC (≤ 100)"))],
              [resnet_precond_row(lam) for lam in ("10.0", "1.0")],
              "9: the preconditioned solvers on the reduced ResNet-18, where its reference converged")


# ---------------------------------------------------------------------------------------------------------------
# Sec. 3 setting at λ = 1e-3: plain and preconditioned CG/LiSSA beside EK-FAC/K-FAC (same model and reference),
# each from its job's ihvp table job<N>_ihvp.csv (one row: its damping)


def pre_row(label: str, name: str, which: Job, iterative: bool = True) -> list[str | Cell]:
    def R(key: str) -> Ref:
        return Sweep(name).job_ref(which, "ihvp.csv", key)

    row: list[str | Cell] = [label, cell("{:.3} / {:.3}", R("rel_error"), R("cosine"))]
    if iterative:
        row += [cell("{:d} ({:e2})", R("iterations"), R("rel_residual")),
                cell("{:d} / {:d}", R("iters_to_0.1"), R("iters_to_0.01")),
                cell("{:s3} / {:s3}", R("time_s_to_0.1"), R("time_s_to_0.01"))]
    else:
        row += ["direct", "–", "–"]
    return row + [cell("{:s3}", R("fit_s")), cell("{:s3}", R("time_s"))]


def _pre(p: str) -> Job:
    return job(f"solver.preconditioner={p}")


SECTION.table("ihvp_precond", ["solver (λ = 1e-3)", "error vs CG / cosine", "iterations (relative residual)",
                               "iterations to error 0.1 / 0.01", "time to error 0.1 / 0.01 (s, fit included)",
                               "fit (s)", "fit + solve (s)"], [
    pre_row("EK-FAC", "ihvp_precond", job(solver="ekfac"), iterative=False),
    pre_row("K-FAC", "ihvp_precond", job(solver="kfac"), iterative=False),
    pre_row("CG (tol 1e-4, ≤ 150 iterations)", "ihvp_precond_cg", _pre("null")),
    pre_row("CG + EK-FAC", "ihvp_precond_cg", _pre("ekfac")),
    pre_row("CG + K-FAC", "ihvp_precond_cg", _pre("kfac")),
    pre_row("LiSSA (depth 200, batch 32)", "ihvp_precond_lissa", _pre("null")),
    pre_row("LiSSA + EK-FAC", "ihvp_precond_lissa", _pre("ekfac")),
    pre_row("LiSSA + K-FAC", "ihvp_precond_lissa", _pre("kfac")),
], "9: the Sec. 3 CNN at λ = 1e-3, plain vs preconditioned iterative solvers")


# the one-step removal of 5d with preconditioned CG (one job per unlearn.size and solver.preconditioner)
_UP = Sweep("unlearn_precond")


def up_row(label: str, which: Job) -> list[str | Cell]:
    return [label, cell("{:d}", _UP("unlearn/n_points", which)),
            cell("{:.3}", _UP("unlearn/edited/test_accuracy", which)),
            cell("{:.3}", _UP("unlearn/edited/set_loss", which)),
            cell("{:d}", _UP("solver/iterations@0.01", which)),
            cell("{:e2}", _UP("solver/rel_residual_max@0.01", which)),
            cell("{:s3}", _UP("time/unlearn_edit_s", which))]


SECTION.table("unlearn_precond", ["solver (λ = 1e-2)", "\\|R\\|", "test acc after the step", "removed-set loss",
                                  "CG iterations", "relative residual", "step time (s)"],
              [up_row(label, job(f"unlearn.size={size}") & _pre(p)) for size in (10, 100)
               for label, p in (("CG", "null"), ("CG + EK-FAC", "ekfac"), ("CG + K-FAC", "kfac"))],
              "9/5d: removal of the flipped points by one Newton step, plain vs preconditioned CG")


# ---------------------------------------------------------------------------------------------------------------
# prose numbers (RESULTS.md's text quotes them as <!-- num:NAME -->...<!-- /num -->): run ihvp_solvers
_LAM = {"1e-5": "1e-05", "1e-4": "0.0001", "1e-3": "0.001", "1e-2": "0.01", "0.1": "0.1", "1": "1.0", "10": "10.0"}


def _sv(name: str, solver: str, tag: str, key: str, f: str) -> None:
    """``key`` of ihvp_solvers' job ``solver`` at damping ``tag`` (a _LAM key), as RESULTS.md's number ``sv_NAME``."""
    SECTION.number(f"sv_{name}", cell("{:" + f + "}", ihvp_ref("ihvp_solvers", solver, _LAM[tag], key)))


def _sv_ratio(name: str, num: str, den: str, tags: list[str], key: str, f: str = "s2") -> None:
    """``num``'s ``key`` over ``den``'s at each damping of ``tags``: one ratio, or "lo–hi" over several."""
    def text() -> str:
        r = [ihvp_ref("ihvp_solvers", num, _LAM[t], key).value() / ihvp_ref("ihvp_solvers", den, _LAM[t], key).value()
             for t in tags]
        return fmt(r[0], f) if len(r) == 1 else f"{fmt(min(r), f)}–{fmt(max(r), f)}"
    SECTION.number(f"sv_{name}", text)


_sv_ratio("pcg_speedup_to_0.1", "cg", "cg_ekfac", ["1e-3", "1e-2"], "ihvp/iters_to_0.1")
_sv_ratio("pcg_speedup_to_0.1_1e-3", "cg", "cg_ekfac", ["1e-3"], "ihvp/iters_to_0.1")
_sv_ratio("pcg_speedup_to_0.1_1e-2", "cg", "cg_ekfac", ["1e-2"], "ihvp/iters_to_0.1")
_sv_ratio("plissa_speedup_to_0.1_1", "lissa", "lissa_ekfac", ["1"], "ihvp/iters_to_0.1")
for _t in ("1e-3", "1e-2", "0.1", "1", "10"):
    for _s in ("cg", "cg_ekfac", "lissa", "lissa_ekfac")[:2 if _t in ("1e-3", "1e-2", "0.1") else 4]:
        _sv(f"{_s}_to_0.1_{_t}", _s, _t, "ihvp/iters_to_0.1", "d")
for _s, _ts in (("cg", ("1e-3", "1e-2", "0.1")), ("cg_ekfac", ("1e-2", "0.1"))):
    for _t in _ts:
        _sv(f"{_s}_to_0.01_{_t}", _s, _t, "ihvp/iters_to_0.01", "d")
for _t in ("1e-3", "1e-2", "0.1"):
    for _s in ("ekfac", "lissa", "lissa_ekfac"):
        _sv(f"{_s}_error_{_t}", _s, _t, "ihvp/rel_error", ".2")
_sv("cg_ekfac_residual_1e-2", "cg_ekfac", "1e-2", "ihvp/rel_residual", "e2")
_sv("cg_iterations_1e-2", "cg", "1e-2", "ihvp/iterations", "d")
for _t in ("1e-4", "1e-5"):
    _sv(f"ref_residual_{_t}", "cg", _t, "ihvp/ref_rel_residual", "s2")
    for _s in ("cg", "cg_ekfac"):
        _sv(f"{_s}_residual_{_t}", _s, _t, "ihvp/rel_residual", "s2")
for _s in ("lissa", "lissa_ekfac"):
    _sv(f"{_s}_time_1e-3", _s, "1e-3", "ihvp/time_s", ".1")
_sv("cg_ekfac_error_1e-3_final", "cg_ekfac", "1e-3", "ihvp/rel_error", "g2")
_sv("ekfac_time_1e-3", "ekfac", "1e-3", "ihvp/time_s", ".2")
SECTION.number("sv_ekfac_time_budget_1e-3", lambda: fmt(
    5 * ihvp_ref("ihvp_solvers", "ekfac", "0.001", "ihvp/time_s").value(), ".1"))
for _s in ("cg", "cg_ekfac"):
    _sv(f"{_s}_time_to_0.1_1e-3", _s, "1e-3", "ihvp/time_s_to_0.1", ".1")
SECTION.number("sv_cg_ekfac_over_budget_1e-3", lambda: fmt(
    ihvp_ref("ihvp_solvers", "cg_ekfac", "0.001", "ihvp/time_s_to_0.1").value()
    / (5 * ihvp_ref("ihvp_solvers", "ekfac", "0.001", "ihvp/time_s").value()), ".1"))
_sv("cg_time_to_0.1_10", "cg", "10", "ihvp/time_s_to_0.1", ".1")

# the tiny models' spectrum (experiments/precond_spectrum.py), EK-FAC with one label sample, λ = 1e-3
for _m, _n in (("cnn", 48), ("mlp", 600), ("cnn", 600)):
    SECTION.number(f"spec_{_m}{_n}_cond", cell("{:e2} → {:e2}", _spec("cond_A", _m, _n, 1e-3, 1e-3),
                                               _spec("cond_PA", _m, _n, 1e-3, 1e-3)))
SECTION.number("spec_cnn48_iters", cell("{:d} vs {:,0}", _spec("cg_iters_plain", "cnn", 48, 1e-3, 1e-3),
                                        _spec("cg_iters_pcg", "cnn", 48, 1e-3, 1e-3)))
SECTION.number("spec_cnn48_iters_ratio", lambda: fmt(_spec("cg_iters_pcg", "cnn", 48, 1e-3, 1e-3).value()
                                                     / _spec("cg_iters_plain", "cnn", 48, 1e-3, 1e-3).value(), ".0"))
SECTION.number("spec_mlp600_iters", cell("{:d} → {:d}", _spec("cg_iters_plain", "mlp", 600, 1e-3, 1e-2),
                                         _spec("cg_iters_pcg", "mlp", 600, 1e-3, 1e-2)))

# K-FAC as the preconditioner too (runs ihvp_precond, ihvp_precond_cg, ihvp_precond_lissa; λ = 1e-3)
SECTION.number("pre_test_acc", cell("{:.3}", Sweep("ihvp_precond")("train/test_accuracy", solver="ekfac")))
SECTION.number("pre_ref_residual", cell("{:e2}", Sweep("ihvp_precond")("ihvp/ref_rel_residual", solver="ekfac")))
SECTION.number("pre_ekfac_error", cell("{:.3}", Sweep("ihvp_precond")("ihvp/rel_error", solver="ekfac")))
for _p in ("null", "ekfac", "kfac"):
    SECTION.number(f"pre_cg_{_p}_to_0.1", cell("{:d}", Sweep("ihvp_precond_cg").job_ref(_pre(_p), "ihvp.csv",
                                                                                        "iters_to_0.1")))
    SECTION.number(f"pre_lissa_{_p}_error", cell("{:.2}", Sweep("ihvp_precond_lissa").job_ref(_pre(_p), "ihvp.csv",
                                                                                              "rel_error")))


# the one-step removal (run unlearn_precond): ranges over the two removal sizes
def _up_range(key: str, pres: Sequence[str], f: str, over: str | None = None) -> Callable[[], str]:
    """"lo–hi" of ``key`` over unlearn_precond's jobs with a preconditioner in ``pres`` (both sizes), or of its
    ratio to the plain-CG job of the same size when ``over`` names the denominator's key."""
    def text() -> str:
        v = [_UP(key, job(f"unlearn.size={n}") & _pre(p)).value()
             / (_UP(over, job(f"unlearn.size={n}") & _pre("null")).value() if over else 1)
             for n in (10, 100) for p in pres]
        return f"{fmt(min(v), f)}–{fmt(max(v), f)}"
    return text


SECTION.number("up_original_acc", cell("{:.3}", _UP("unlearn/original/test_accuracy", job("unlearn.size=100")
                                                    & _pre("null"))))
SECTION.number("up_edited_acc_100", cell("{:.3}", _UP("unlearn/edited/test_accuracy", job("unlearn.size=100")
                                                      & _pre("ekfac"))))
SECTION.number("up_cg_iters", _up_range("solver/iterations@0.01", ["null"], "d"))
SECTION.number("up_cg_time", _up_range("time/unlearn_edit_s", ["null"], ".1"))
SECTION.number("up_pcg_ekfac_iters", _up_range("solver/iterations@0.01", ["ekfac"], "d"))
SECTION.number("up_pcg_kfac_residual", lambda: (lambda lo, hi: f"{lo.split('e')[0]}–{hi}")(  # "2.2–3.2e-5"
    *_up_range("solver/rel_residual_max@0.01", ["kfac"], "e2")().split("–")))
SECTION.number("up_pcg_time", _up_range("time/unlearn_edit_s", ["ekfac", "kfac"], "s2"))
SECTION.number("up_pcg_time_ratio", _up_range("time/unlearn_edit_s", ["ekfac", "kfac"], "s2", over="time/unlearn_edit_s"))

# the reduced ResNet-18 (runs ihvp_resnet18_pcg, ihvp_resnet18_lissa_ekfac, ihvp_resnet18; λ = 10 and 1)
_R18 = {"10": "10.0", "1": "1.0"}


def _r18(name: str, run: str, solver: str, tag: str, key: str, f: str) -> None:
    SECTION.number(f"r18p_{name}", cell("{:" + f + "}", ihvp_ref(run, solver, _R18[tag], key)))


def _r18_step(run: str, solver: str, f: str) -> Callable[[], str]:
    """"lo–hi" over λ = 10 and 1 of the seconds per iteration/step: (fit + solve − fit) / iterations."""
    def text() -> str:
        v = [(lambda df: (df["ihvp/time_s"] - df["fit/compute_s"]) / df["ihvp/iterations"])(
            ihvp_ref(run, solver, lam, "ihvp/time_s").rows()).iloc[0] for lam in _R18.values()]
        return f"{fmt(min(v), f)}–{fmt(max(v), f)}"
    return text


for _t in _R18:
    _r18(f"ref_residual_{_t}", "ihvp_resnet18_pcg", "cg", _t, "ihvp/ref_rel_residual", "e2")
    for _s in ("cg", "cg_ekfac"):
        _r18(f"{_s}_to_0.1_{_t}", "ihvp_resnet18_pcg", _s, _t, "ihvp/iters_to_0.1", "d")
    _r18(f"lissa_ekfac_error_{_t}", "ihvp_resnet18_lissa_ekfac", "lissa_ekfac", _t, "ihvp/rel_error", ".2")
    _r18(f"lissa_error_{_t}", "ihvp_resnet18", "lissa", _t, "ihvp/rel_error", ".2")
_r18("test_acc", "ihvp_resnet18_lissa_ekfac", "ekfac", "10", "train/test_accuracy", ".3")
_r18("ekfac_error_fresh_10", "ihvp_resnet18_lissa_ekfac", "ekfac", "10", "ihvp/rel_error", ".3")
for _s in ("cg", "cg_ekfac"):
    _r18(f"{_s}_to_0.01_10", "ihvp_resnet18_pcg", _s, "10", "ihvp/iters_to_0.01", "d")
    _r18(f"{_s}_iterations_10", "ihvp_resnet18_pcg", _s, "10", "ihvp/iterations", "d")
    _r18(f"{_s}_time_10", "ihvp_resnet18_pcg", _s, "10", "ihvp/time_s", "d")
_r18("cg_ekfac_residual_10", "ihvp_resnet18_pcg", "cg_ekfac", "10", "ihvp/rel_residual", "e2")
_r18("cg_to_0.01_1", "ihvp_resnet18_pcg", "cg", "1", "ihvp/iters_to_0.01", "d")
_r18("cg_ekfac_error_1", "ihvp_resnet18_pcg", "cg_ekfac", "1", "ihvp/rel_error", ".3")
_r18("cg_ekfac_fit", "ihvp_resnet18_pcg", "cg_ekfac", "10", "fit/compute_s", "d")
_r18("ekfac_fit_fresh", "ihvp_resnet18_lissa_ekfac", "ekfac", "10", "fit/compute_s", ".1")
SECTION.number("r18p_ekfac_apply", lambda: fmt((lambda df: (df["ihvp/time_s"] - df["fit/compute_s"]).iloc[0])(
    ihvp_ref("ihvp_resnet18_lissa_ekfac", "ekfac", "10.0", "ihvp/time_s").rows()), "s1"))
SECTION.number("r18p_ekfac_error_span", lambda: "–".join(
    fmt(ihvp_ref("ihvp_resnet18", "ekfac", lam, "ihvp/rel_error").value(), ".2") for lam in ("1.0", "10.0")))
for _run, _s, _f in (("ihvp_resnet18", "lissa", "s2"), ("ihvp_resnet18_lissa_ekfac", "lissa_ekfac", "s2"),
                     ("ihvp_resnet18_pcg", "cg", ".1"), ("ihvp_resnet18_pcg", "cg_ekfac", ".1")):
    SECTION.number(f"r18p_{_s}_step_s", _r18_step(_run, _s, _f))

# run ihvp_solvers' wall time (timings.txt) and the Jacobian products it used (benchmarks/bench_cg_products.py)
SECTION.number("sv_wall_s", lambda: fmt(timing("ihvp_solvers"), ",0"))
_CGP = "benchmarks/results/cg_products.csv"
SECTION.number("sv_cgp_jacobian_s_8", cell("{:.2}", ref(_CGP, "jacobian_s", k=8)))
SECTION.number("sv_cgp_jvp_s_8", cell("{:.1}", ref(_CGP, "jvp_s", k=8)))
SECTION.number("sv_cgp_form_s", cell("{:.1}", ref(_CGP, "jacobian_form_s", k=8)))
SECTION.number("sv_cg_error_max", lambda: fmt(max(ihvp_ref("ihvp_solvers", "cg", _LAM[t], "ihvp/rel_error").value()
                                                 for t in ("1e-3", "1e-2", "0.1", "1", "10")), ".3"))

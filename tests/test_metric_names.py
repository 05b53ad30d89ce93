"""Per-damping metric names: the codec writes exactly the names runs have always logged, and reads back every name
of the committed results."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from influencelab.metric_names import PARAMETERS, damping_label, damping_value, metric_name, parse_metric_name

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"


@pytest.mark.parametrize(("args", "kw", "name"), [
    # ihvp and solver/*: 6 significant digits (also the convergence records' JSON keys)
    (("ihvp/rel_error", 1e-3), {}, "ihvp/rel_error@0.001"),
    (("solver/iterations", 1e-5), {}, "solver/iterations@1e-05"),
    (("ihvp/cosine", 10.0), {}, "ihvp/cosine@10"),
    (("ihvp/time_s", 1234567.0), {}, "ihvp/time_s@1.23457e+06"),
    # lds and mislabel: the float's repr, the ranking's metric after the damping
    (("lds/mean", 1.0), {"exact": True}, "lds/mean@1.0"),
    (("lds_margin/ci_low", 1e-4), {"exact": True}, "lds_margin/ci_low@0.0001"),
    (("mislabel/self_influence", 0.1, "recall@10"), {"exact": True}, "mislabel/self_influence@0.1/recall@10"),
    (("mislabel/self_influence", 1e-5, "roc_auc_ci_low"), {"exact": True},
     "mislabel/self_influence@1e-05/roc_auc_ci_low"),
    (("lds/mean", "auto"), {"exact": True}, "lds/mean@auto"),
    (("lds/mean", None), {"exact": True}, "lds/mean"),  # the first damping: the bare name
])
def test_written_names_are_todays_and_read_back(args, kw, name):
    assert metric_name(*args, **kw) == name
    base = args[0] + (f"/{args[2]}" if len(args) > 2 else "")
    assert parse_metric_name(name) == (base, damping_value(args[1]))


def test_both_spellings_read_as_one_damping_and_parameters_are_not_dampings():
    assert parse_metric_name("lds/mean@1")[1] == parse_metric_name("lds/mean@1.0")[1] == 1.0
    assert parse_metric_name("x/y@0.12345678") == ("x/y", 0.123457)
    for name in ("mislabel/loss/recall@10", "mislabel/loss/recall@10_ci_low", "mislabel/self_influence/minus_loss@10",
                 "mislabel/self_influence/minus_loss@20_p", "train/test_accuracy", "ihvp/iters_to_0.01"):
        assert parse_metric_name(name) == (name, None)
    assert parse_metric_name("mislabel/self_influence@0.1/minus_loss@10") == (
        "mislabel/self_influence/minus_loss@10", 0.1)
    assert damping_label(1e-3) == "0.001" and damping_label(1.0, exact=True) == "1.0"
    for bad in ("mislabel/loss/recall", "x/minus_loss", "a@1"):  # its '@' would not read back as a damping
        with pytest.raises(ValueError):
            metric_name(bad, 0.1)


def test_every_committed_report_column_reads_back():
    """Each column of the committed sweeps (``experiments/results/*/report.csv``) with a damping in its name is
    one the codec writes (in one of its two spellings), and no other column parses as one."""
    columns = {c for p in RESULTS.glob("*/report.csv") for c in pd.read_csv(p, nrows=0).columns}
    tagged = {c: parse_metric_name(c) for c in columns if parse_metric_name(c)[1] is not None}
    assert len(tagged) >= 20
    for name, (base, damping) in tagged.items():
        head, _, tail = name.partition("@")
        rest = tail.partition("/")[2] or None
        assert name in (metric_name(head, damping, rest), metric_name(head, damping, rest, exact=True)), name
        assert base == head + (f"/{rest}" if rest else "")
    # the others' '@' follows a metric's parameter (recall@10)
    assert all(c.split("@")[0].rsplit("/", 1)[-1] in PARAMETERS for c in columns - set(tagged) if "@" in c)

"""The specs of experiments/RESULTS.md's generated tables, one module per section of RESULTS.md (the engine is
experiments/tables_engine.py, the command line experiments/tables.py).

Each module defines ``SECTION = Section("...")`` and registers its tables with ``SECTION.table(NAME, header,
rows, note)`` (and, once RESULTS.md's prose quotes generated numbers, ``SECTION.number(NAME, value)``). Paths are
relative to the repository; every ``experiments/results/NAME/report.csv`` is written by
``bash experiments/run_here.sh NAME`` (its ``run NAME ...`` line), and a job of it is named by its overrides
(:func:`tables_engine.job`), never by its number.

Adding a table: one ``SECTION.table(...)`` in the module of its section, ``<!-- table:NAME -->`` /
``<!-- /table -->`` around the place it goes in RESULTS.md, then ``python experiments/tables.py``;
``tests/test_results_tables.py`` fails whenever the two disagree, or a marker has no spec or a spec no marker.
Adding a section: a module here, listed in ``MODULES``.
"""

MODULES = ("mislabel", "detectors", "attribution", "ihvp_exact", "ihvp", "precond", "lds", "dattri", "unlearn", "benchmarks", "gpu", "mnist5k")

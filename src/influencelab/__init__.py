"""influencelab: influence-function data attribution (EK-FAC, K-FAC, LiSSA, CG, exact, identity), as a Python API
(:class:`Attributor` on your own model and data) and a Hydra-driven pipeline (the ``influencelab`` command).
``load_run(dir)`` loads one run; ``load_sweep(dir)``, a multirun as a DataFrame (a row per job and damping)."""

from .api import Attributor
from .run import Run, load_run
from .sweeps import load_sweep
from .tasks import ClassificationTask, LanguageModelingTask, RegressionTask, Task

__version__ = "0.1.0"
__all__ = ["Attributor", "ClassificationTask", "LanguageModelingTask", "RegressionTask", "Run", "Task", "load_run",
           "load_sweep", "__version__"]

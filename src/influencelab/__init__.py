"""influencelab: influence-function data attribution (LiSSA, EK-FAC, K-FAC, CG, exact) driven by Hydra."""

from .run import Run, load_run

__version__ = "0.1.0"
__all__ = ["Run", "load_run", "__version__"]

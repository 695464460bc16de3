"""Shared pytest fixtures and markers for the falcontune test-suite.

* ``sdist``: the source archive of this checkout (``python -m build --sdist``).
* ``shared_data``: the reference-data directory ``<repo>/../shared/data``. Tests that use it are
  skipped when it is absent, except under ``CI=true`` where its absence is a failure.
* ``cuda`` marker: tests marked ``@pytest.mark.cuda`` are skipped unless
  ``falcontune.cuda_available()`` returns True (any import problem counts as "no CUDA").
* ``HF_HUB_OFFLINE=1`` for the whole session: Hub repo ids resolve only from caches the tests fill.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test reaches the Hugging Face Hub: repo ids resolve from caches the tests build (test_hub.py).
# Set before anything imports huggingface_hub; subprocesses (the falcontune command) inherit it.
os.environ["HF_HUB_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parent.parent
# FALCONTUNE_SHARED_DATA overrides the location (the GPU machine gets a copy inside the checkout)
SHARED_DATA = Path(os.environ.get("FALCONTUNE_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _cuda_available() -> tuple[bool, str]:
    try:
        import falcontune as ft
    except Exception as exc:  # ImportError, or the C extension failing to load
        return False, f"falcontune not importable ({type(exc).__name__}: {exc})"
    fn = getattr(ft, "cuda_available", None)
    if fn is None:
        return False, "falcontune.cuda_available() not implemented"
    try:
        ok = bool(fn())
    except Exception as exc:
        return False, f"falcontune.cuda_available() raised {type(exc).__name__}: {exc}"
    return ok, "" if ok else "CUDA backend not available (falcontune.cuda_available() is False)"


def pytest_configure(config):
    # Registered in pyproject.toml as well; repeating it keeps the suite warning-free when run
    # from another rootdir.
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU and the CUDA backend (skipped otherwise)")
    config.addinivalue_line("markers", "slow: long-running test")


def pytest_collection_modifyitems(config, items):
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_items:
        return
    ok, reason = _cuda_available()
    if ok:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in cuda_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the shared reference data (``<repo>/../shared/data``)."""
    if not SHARED_DATA.is_dir():
        msg = f"shared reference data not found at {SHARED_DATA}"
        if _in_ci():
            pytest.fail(msg + " (CI=true: the data is required)", pytrace=False)
        pytest.skip(msg)
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The source archive of this checkout, as `python -m build --sdist` makes it (without an isolated
    build environment: the test environment already has setuptools and numpy, and needs no network)."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("build") is None:  # the [test] extra installs it
        msg = "building the sdist needs the 'build' package (pip install build)"
        if _in_ci():
            pytest.fail(msg + " (CI=true: it is required)", pytrace=False)
        pytest.skip(msg)
    out = tmp_path_factory.mktemp("sdist")
    r = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out),
                        str(REPO_ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (archive,) = out.glob("falcontune-*.tar.gz")
    return archive

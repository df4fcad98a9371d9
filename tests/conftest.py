"""Shared test helpers: where the reference fixtures of the original ruDALL-E live."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _fixtures_dir() -> Path:
    env = os.environ.get("RUDALLE_PIPE_FIXTURES")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Path of ``../shared/fixtures`` (outputs of rudalle 1.1.3 on small random weights).

    Set ``RUDALLE_PIPE_FIXTURES`` to point elsewhere. In CI (``CI=true``) a missing folder is an
    error, never a skip, so parity tests cannot silently vanish.
    """
    path = _fixtures_dir()
    if not (path / "README.md").exists():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"reference fixtures not found at {path}")
        pytest.skip(f"reference fixtures not found at {path} (set RUDALLE_PIPE_FIXTURES)")
    return path


def import_reference(name: str):
    """Import ``name``, a test-only reference implementation (e.g. ``youtokentome``, which needs a C++
    compiler to install). Without it the test is skipped, with the reason, except in CI (``CI=true``),
    where a missing reference is an error: parity tests cannot silently vanish there."""
    if os.environ.get("CI"):
        import importlib

        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"{name} is not installed (it needs a C++ compiler; README, Tests)")


def add_to_hub_cache(cache_dir: Path, repo_id: str, files: dict[str, Path | bytes], *,
                     revision: str = "main") -> Path:
    """Lay out ``files`` (name -> source path or bytes) as a snapshot of ``repo_id`` in a Hugging
    Face cache at ``cache_dir``, the way ``hf_hub_download`` leaves it, and return the snapshot dir."""
    import hashlib
    import shutil

    repo_dir = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    for name, source in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copyfile(source, target)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache directory with the Hub switched off (``HF_HUB_OFFLINE=1``).

    huggingface_hub reads the variable at import time, so the constant is patched as well."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache

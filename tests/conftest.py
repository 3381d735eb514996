"""Shared fixtures. A small artifact set is built once per session from the MovieLens data shipped
in data/ (tests never read ../shared), with the real BERT encoder, implicit ALS, FAISS, torch and
LightGBM; integration tests start the real Triton and services on it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATA = f"movielens:{REPO / 'data' / 'ml-latest-small'}"


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(artifact root, model repository) of a small but real build: 600 items, 150 users."""
    from offline.build import BuildOptions, build
    root = tmp_path_factory.mktemp("build")
    build(BuildOptions(data=DATA, artifacts=root / "artifacts", model_repo=root / "model_repository",
                       cache_dir=REPO / ".cache", max_items=600, max_users=150, epochs=2, progress=False))
    return root / "artifacts", root / "model_repository"


@pytest.fixture(scope="session")
def artifacts(built):
    from common.artifacts import open_artifacts
    return open_artifacts(built[0])


@pytest.fixture(scope="session")
def synthetic_built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Artifact root of a build on the planted-topic synthetic MIND data (impressions included)."""
    from offline.build import BuildOptions, build
    root = tmp_path_factory.mktemp("synthetic")
    build(BuildOptions(data=f"synthetic:{root / 'data'}", artifacts=root / "artifacts",
                       model_repo=root / "model_repository", cache_dir=REPO / ".cache", epochs=2,
                       progress=False))
    return root / "artifacts"

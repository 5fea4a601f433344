"""Shared helpers for the tests."""

from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parent / "assets"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def user_models_file() -> Path:
    return ASSETS / "user_models.py"

"""Shared fixtures."""

import pytest


@pytest.fixture(scope="session")
def tiny():
    """The tiny random-weight model builders."""
    from invardiff.models import tiny as builders

    return builders

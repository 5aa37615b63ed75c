"""Fixtures for every test module in tests/ (helpers.py holds the plain functions)."""

import pytest

from helpers import make_dataset


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / 'data')

"""Fixtures for every test module in tests/ (helpers.py holds the plain functions)."""

import os

import pytest

from helpers import make_dataset


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / 'data')


def pytest_configure(config):
    # Under pytest-xdist (pytest.ini runs two workers), each worker is a process with its own torch:
    # one thread each keeps the workers from fighting over the cores (tests' subprocesses already
    # run with OMP_NUM_THREADS=1, helpers.ENV; a model this small is fastest on one thread anyway).
    if os.environ.get('PYTEST_XDIST_WORKER'):
        import torch
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # The end-to-end (slow) tests first: pytest-xdist hands tests out in this order, so the longest
    # ones start early and the workers finish together instead of one waiting on a late long test.
    items.sort(key=lambda item: item.get_closest_marker('slow') is None)

"""Shared test fixtures.

Tests that initialise a DeepSpeed engine in the pytest process fill in RANK, WORLD_SIZE,
MASTER_PORT, ... (a world of one); a training subprocess must not inherit them, or it tries to
serve the parent's rendezvous port.
"""

import os

import pytest
from support.training_runs import prepared_shards

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "CROSS_RANK", "CROSS_SIZE")


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}


@pytest.fixture(scope="session")
def data_args(tmp_path_factory, subprocess_env) -> list[str]:
    """The demo corpus prepared once per session (a 1-step run of the tiny model): the overrides
    that train on its shards (tests/test_resume.py, tests/test_elastic_resume.py)."""
    return prepared_shards(subprocess_env, tmp_path_factory.mktemp("prepare"))

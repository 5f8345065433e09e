"""Shared test fixtures.

Tests that initialise a DeepSpeed engine in the pytest process fill in RANK, WORLD_SIZE,
MASTER_PORT, ... (a world of one); a training subprocess must not inherit them, or it tries to
serve the parent's rendezvous port.
"""

import os

import pytest

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "CROSS_RANK", "CROSS_SIZE")


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}

"""The toy world (``safety_world.World``), made once per session."""
from __future__ import annotations

import pytest
from safety_world import World


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("safety"))

"""Shared by the distributed tests: the toy model (tiny llama + char tokenizer, saved offline) and
corpus, made once per session. How commands are started: ``dist_launch.py``."""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import pytest


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> Tuple[Path, Path]:
    """(model_dir, corpus_dir) of ``lape_kernels.experiment.toy.make_toy_setup``."""
    from lape_kernels.experiment.toy import make_toy_setup

    return tuple(map(Path, make_toy_setup(str(tmp_path_factory.mktemp("toy")))))

"""Models of one shape that are different models, and statistics recorded on them."""
from __future__ import annotations

import pytest
import torch

import lape_kernels as lk
from lape_kernels.testing import random_batch, tiny_model

LANGS = ["en", "cy"]


def named_model(name: str, seed: int = 0, family: str = "llama", **kwargs):
    """A tiny model whose config says it was loaded from ``name`` (as from_pretrained sets it)."""
    kwargs.setdefault("varied_signs", False)  # probabilities below 1, so that identify selects neurons
    model = tiny_model(family, seed=seed, **kwargs)
    model.config._name_or_path = name
    return model


def recorded(model, languages=LANGS, seed: int = 0):
    """StatsByLanguage of one padded batch (one sequence per language, repeated)."""
    ids, mask = random_batch(batch=2 * len(languages), seq=24, seed=seed)
    with torch.no_grad(), lk.record(model, languages=languages) as stats:
        stats.set_batch_languages(torch.arange(2 * len(languages)) % len(languages))
        model(ids, attention_mask=mask)
    return stats


@pytest.fixture
def base():
    return named_model("org/base-model", seed=0)


@pytest.fixture
def instruct():
    """Same architecture and shape as ``base``, other weights (as an instruct variant)."""
    return named_model("org/instruct-model", seed=1)

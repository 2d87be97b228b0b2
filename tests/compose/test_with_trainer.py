"""transformers.Trainer and a patched model: a run resumed from a checkpoint, and a run with
gradient checkpointing, end with the very weights of one uninterrupted run."""
from __future__ import annotations

import pytest
import torch

import lape_kernels as lk
from lape_kernels.testing import random_neurons, tiny_model

transformers = pytest.importorskip("transformers")

STEPS = 4


class _Rows(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(11)
        self.rows = torch.randint(3, 256, (8, 12), generator=g)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i].clone()}


def _model():
    return lk.patch(tiny_model("gemma3_text", num_layers=2), neurons=random_neurons(2, 128, 5, seed=8)).train()


def _train(model, out, resume=None, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-2,
        lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=1.0, report_to=[], use_cpu=True,
        seed=3, disable_tqdm=True, logging_strategy="no", dataloader_num_workers=0, **kw)
    transformers.Trainer(model=model, args=args, train_dataset=_Rows()).train(resume_from_checkpoint=resume)
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lape_" in n}


def test_resume_and_gradient_checkpointing_give_the_uninterrupted_weights(tmp_path):
    want = _train(_model(), tmp_path / "straight", save_strategy="no")
    assert len(want) == 6  # 2 layers x (gate rows, up rows, down columns)

    _train(_model(), tmp_path / "saved", save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "saved" / "checkpoint-2"
    assert checkpoint.is_dir()
    resumed = _train(_model(), tmp_path / "saved", resume=str(checkpoint), save_strategy="no")
    assert resumed.keys() == want.keys()
    assert all(torch.equal(resumed[n], want[n]) for n in want)

    checkpointed = _train(_model(), tmp_path / "gc", save_strategy="no", gradient_checkpointing=True)
    assert all(torch.equal(checkpointed[n], want[n]) for n in want)

    untrained = {n: p for n, p in _model().named_parameters() if "lape_" in n}
    assert all(not torch.equal(want[n], untrained[n]) for n in want)  # the runs did train

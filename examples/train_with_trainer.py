"""Sparse language-neuron fine-tuning with ``transformers.Trainer``: train, save, reload, merge.

``lape_kernels.patch(model, neurons=...)`` leaves only the selected neurons' slices trainable,
so the Trainer's default AdamW optimises exactly those; the chunked LM loss is used through the
model's ``forward`` (the Trainer needs nothing special). Runs in well under a minute on CPU:

    python examples/train_with_trainer.py                          # tiny random Llama
    python examples/train_with_trainer.py --family phi3
    python examples/train_with_trainer.py --model smollm2-135m --steps 10
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lape_kernels  # noqa: E402
from lape_kernels.training import trainable_parameters  # noqa: E402

from train_plain_loop import TEXT, example_arguments, load, pick_neurons, save_reload_merge  # noqa: E402  (same directory)


class Blocks(torch.utils.data.Dataset):
    """Fixed-length blocks of the tokenised text, as causal-LM examples (labels = inputs)."""

    def __init__(self, tok, seq: int):
        ids = tok(TEXT, return_tensors="pt")["input_ids"][0]
        n = (ids.numel() - 1) // seq
        self.rows = ids[: n * seq].view(n, seq)

    def __len__(self):
        return self.rows.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i].clone()}


def main(argv=None) -> int:
    from transformers import Trainer, TrainingArguments

    p = example_arguments(__doc__)
    p.add_argument("--grad-accum", type=int, default=2)
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="lape_trainer_"))

    model, tok, make_fresh = load(args)
    neurons, language = pick_neurons(model, args)
    lape_kernels.patch(model, neurons=neurons, language=language)
    n_train = sum(p.numel() for p in trainable_parameters(model))
    print(f"trainable: {n_train:,} of {sum(p.numel() for p in model.parameters()):,} parameters")

    targs = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=0.01,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        logging_steps=max(1, args.steps // 5),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=Blocks(tok, args.seq))
    result = trainer.train()
    print(f"trainer finished: train_loss {result.training_loss:.4f}")

    probe = Blocks(tok, args.seq)[0]["input_ids"][None].to(next(model.parameters()).device)
    save_reload_merge(model, make_fresh, probe, out)
    print(f"done in {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

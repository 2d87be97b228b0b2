"""Sparse language-neuron fine-tuning in a plain PyTorch loop: train, save, reload, merge.

Only the selected neurons' rows of gate/up and columns of down are trained; the base weights
stay frozen and untouched until ``merge``. Runs in well under a minute on CPU:

    python examples/train_plain_loop.py                        # tiny random Llama
    python examples/train_plain_loop.py --family gemma3_text   # any supported family
    python examples/train_plain_loop.py --model smollm2-135m --steps 10   # the packaged SmolLM2
    python examples/train_plain_loop.py --neurons NEURONS_DIR --language mt  # a NeuronSet
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lape_kernels  # noqa: E402
from lape_kernels.training import load_neurons, merge, save_neurons, trainable_parameters  # noqa: E402

TEXT = (
    "Il-Malti huwa l-lingwa nazzjonali ta' Malta u lingwa uffiċjali tal-Unjoni Ewropea. "
    "Huwa l-uniku lsien Semitiku miktub bl-alfabett Latin. Il-kliem ġej mill-Għarbi, mit-Taljan "
    "u mill-Ingliż. Kull sena jinqraw ħafna kotba u gazzetti bil-Malti. "
) * 8


def load(args):
    """(model, tokenizer, fresh-copy factory)."""
    from lape_kernels.data.models import load_model
    from lape_kernels.testing import tiny_model, tiny_tokenizer

    if args.model == "tiny":
        def make():
            return tiny_model(args.family, seed=0)

        return make(), tiny_tokenizer(), make

    def make():
        return load_model(args.model)[0]

    model, tok = load_model(args.model)
    return model, tok, make


def batches(tok, seq: int, batch: int, device):
    ids = tok(TEXT, return_tensors="pt")["input_ids"][0]
    n = (ids.numel() - 1) // seq
    rows = ids[: n * seq].view(n, seq)
    while True:
        for i in range(0, n - batch + 1, batch):
            yield rows[i : i + batch].to(device)


def pick_neurons(model, args):
    if args.neurons:
        from lape_kernels.neurons import NeuronSet

        return NeuronSet.load(args.neurons), args.language
    from lape_kernels.introspection import mlp_shape
    from lape_kernels.testing import random_neurons

    L, _, inter = mlp_shape(model)
    return random_neurons(L, inter, max(1, round(args.frac * inter)), seed=args.seed), None


def example_arguments(doc: str) -> argparse.ArgumentParser:
    """The command-line options both training examples take."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (random) or a packaged/local model, e.g. smollm2-135m")
    p.add_argument("--family", default="llama", help="family of the tiny model")
    p.add_argument("--neurons", default=None, help="a saved NeuronSet (default: random neurons)")
    p.add_argument("--language", default=None)
    p.add_argument("--frac", type=float, default=0.05, help="random neurons per layer")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="where to save neurons / merged model (default: a temp dir)")
    return p


def save_reload_merge(model, make_fresh, probe, out: Path) -> None:
    """Save the trained neurons, load them onto a fresh base model (same logits, bit for bit),
    merge them into its weights and save that as a plain Hugging Face model."""
    model.eval()
    adapter = save_neurons(model, out / "neurons")
    size = sum(f.stat().st_size for f in adapter.iterdir())
    print(f"saved trained neurons to {adapter} ({size / 1024:.1f} KiB)")
    with torch.no_grad():
        want = model(probe).logits
        fresh = load_neurons(make_fresh().to(probe.device), adapter).eval()
        got = fresh(probe).logits
        print(f"reloaded onto a fresh base model: max |logit diff| = {(got - want).abs().max().item():.2e}")
        merged = merge(fresh)
        diff = (merged(probe).logits - want).abs().max().item()
    merged.save_pretrained(out / "merged")
    print(f"merged into the base weights (max |logit diff| {diff:.2e}); plain HF model saved to {out / 'merged'}")


def main(argv=None) -> int:
    p = example_arguments(__doc__)
    p.add_argument("--recompute", default="none", choices=("none", "up", "gate_up"),
                   help="recompute these MLP projections in backward instead of keeping them (less memory)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="lape_train_"))

    model, tok, make_fresh = load(args)
    neurons, language = pick_neurons(model, args)
    # also installs the chunked loss; recompute= trades activation memory for GEMMs (same results)
    lape_kernels.patch(model, neurons=neurons, language=language, recompute=args.recompute)
    params = trainable_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in params)
    print(f"trainable: {n_train:,} of {total:,} parameters ({n_train / total:.3%})")

    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    model.train()
    data = batches(tok, args.seq, args.batch, next(model.parameters()).device)
    for step in range(args.steps):
        ids = next(data)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, args.steps // 6) == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    save_reload_merge(model, make_fresh, next(batches(tok, args.seq, 1, next(model.parameters()).device)), out)
    print(f"done in {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

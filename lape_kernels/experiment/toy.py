"""A toy setup for trying the CLI in seconds (and for the tests): a tiny random model saved
with ``save_pretrained`` and a synthetic multilingual corpus directory.

    python -m lape_kernels.experiment.toy /tmp/toy [FAMILY]     # FAMILY: llama (default), qwen3_moe, mixtral, ...
    lape-kernels demo --model /tmp/toy/model --data /tmp/toy/corpus --target aa \\
        --languages aa bb cc en --config /tmp/toy/demo.json --out /tmp/toy/demo

Each toy "language" draws its characters from its own alphabet, so languages differ in which
tokens (and so which MLP neurons) they use; ``parallel.jsonl`` holds aligned toy sentences.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

__all__ = ["TOY_ALPHABETS", "TOY_DEMO_CONFIG", "make_toy_setup"]

TOY_ALPHABETS: Dict[str, str] = {
    "aa": "abcdefgh ",
    "bb": "mnopqrst ",
    "cc": "uvwxyz12 ",
    "en": "the quick brown fox jumps ",
}

#: budgets for ``lape-kernels demo --config`` on the toy setup (seconds on a laptop CPU)
TOY_DEMO_CONFIG = {
    "collect_tokens": 2048, "collect_seq_len": 64, "collect_batch_size": 8, "top_rate": 0.1,
    "train_tokens": 1024, "seq_len": 64, "batch_size": 4, "train_val_tokens": 256,
    "eval_val_tokens": 256, "eval_batch_size": 4, "parallel_n": 8,
}


def _line(rng: random.Random, alphabet: str, lo: int, hi: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi))).strip() or alphabet[0]


def make_toy_setup(root: str, family: str = "llama", lines: int = 300, seed: int = 0,
                   alphabets: Optional[Dict[str, str]] = None, num_layers: int = 2, **overrides) -> Tuple[Path, Path]:
    """Write ``root/model`` (tiny ``family`` model + char tokenizer), ``root/corpus``
    (``<lang>.txt`` per language, ``parallel.jsonl``) and ``root/demo.json``. Returns
    (model_dir, corpus_dir). ``overrides``: config fields of the model (e.g. ``num_experts``)."""
    from ..testing import tiny_model, tiny_tokenizer

    root_p = Path(root)
    alphabets = alphabets or TOY_ALPHABETS
    model_dir, corpus_dir = root_p / "model", root_p / "corpus"
    model_dir.mkdir(parents=True, exist_ok=True)
    corpus_dir.mkdir(parents=True, exist_ok=True)
    tiny_model(family, seed=seed, num_layers=num_layers, intermediate=128, varied_signs=False,
               **overrides).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    rng = random.Random(seed)
    for lang, alphabet in alphabets.items():
        text = "\n".join(_line(rng, alphabet, 40, 120) for _ in range(lines)) + "\n"
        (corpus_dir / f"{lang}.txt").write_text(text)
    with open(corpus_dir / "parallel.jsonl", "w") as fh:
        for _ in range(32):
            fh.write(json.dumps({lang: _line(rng, a, 20, 40) for lang, a in alphabets.items()}) + "\n")
    (root_p / "demo.json").write_text(json.dumps(TOY_DEMO_CONFIG, indent=1) + "\n")
    return model_dir, corpus_dir


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        print("usage: python -m lape_kernels.experiment.toy DIR [FAMILY]  (a lape_kernels.testing tiny family: "
              "llama, qwen3_moe, mixtral, ...)", file=sys.stderr)
        sys.exit(2)
    m, c = make_toy_setup(sys.argv[1], *sys.argv[2:])
    print(f"model: {m}\ncorpus: {c}\ndemo config: {Path(sys.argv[1]) / 'demo.json'}")

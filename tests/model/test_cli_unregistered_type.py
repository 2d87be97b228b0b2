"""A model type that no registry names (OLMo 2) goes end to end through the command line on a
tiny local model: found by structure, collect -> identify -> finetune -> eval."""
from __future__ import annotations

import json

import pytest

from lape_kernels import introspection, model_matrix
from lape_kernels.cli import main
from lape_kernels.experiment.toy import TOY_ALPHABETS, make_toy_setup

LANGS = sorted(TOY_ALPHABETS)
SMALL = ["--seq-len", "64"]


def _trained_tokenizer(corpus_dir):
    """A BPE tokenizer trained offline on the toy corpus (<pad>=0, <s>=1, </s>=2, as the
    tiny model's config), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  show_progress=False)
    tk.train([str(p) for p in sorted(corpus_dir.glob("*.txt"))], trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    assert tk.get_vocab_size() <= model_matrix.VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


@pytest.fixture(scope="module")
def olmo2(tmp_path_factory):
    root = tmp_path_factory.mktemp("olmo2")
    model_dir, corpus = make_toy_setup(str(root), lines=200)
    for f in model_dir.iterdir():  # replace the toy llama with a tiny OLMo 2 and a trained tokenizer
        f.unlink()
    model = model_matrix.tiny_model_of_type("olmo2")
    assert model.config.model_type == "olmo2" and "olmo2" not in introspection.FAMILIES
    model.save_pretrained(model_dir)
    _trained_tokenizer(corpus).save_pretrained(model_dir)
    return {"root": root, "model": str(model_dir), "corpus": str(corpus)}


def test_olmo2_collect_identify_finetune_eval(olmo2, tmp_path):
    stats, neurons, run, ev = tmp_path / "stats", tmp_path / "neurons", tmp_path / "run", tmp_path / "eval.json"
    assert main(["collect", "--model", olmo2["model"], "--data", olmo2["corpus"], "--languages", *LANGS,
                 "--tokens", "1024", "--batch-size", "8", "-o", str(stats), *SMALL]) == 0
    index = json.loads((stats / "index.json").read_text()) if (stats / "index.json").exists() else None
    files = sorted(p.name for p in stats.iterdir())
    assert files, "collect wrote nothing"
    assert main(["identify", str(stats), "--top-rate", "0.1", "-o", str(neurons)]) == 0
    assert main(["finetune", "--model", olmo2["model"], "--data", olmo2["corpus"], "--language", "aa",
                 "--method", "neurons", "--neurons", str(neurons), "--steps", "3", "--batch-size", "4",
                 "--eval-every", "3", "--val-tokens", "256", "-o", str(run), *SMALL]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log and all(r["loss"] == r["loss"] for r in log if "loss" in r)  # finite, present
    assert main(["eval", "--model", olmo2["model"], "--data", olmo2["corpus"], "--languages", *LANGS,
                 "--target", "aa", "--run", str(run), "--val-tokens", "256", "--parallel", "8",
                 "-o", str(ev), *SMALL]) == 0
    result = json.loads(ev.read_text())
    assert set(result["before"]["ppl"]) == set(LANGS) and set(result["after"]["ppl"]) == set(LANGS)
    norms = result["update_norms"]["per_layer"]
    assert len(norms) == 2 and any(n["mlp"] > 0 for n in norms) and all(n["attention"] == 0.0 for n in norms)
    if index is not None:
        assert "olmo2" in json.dumps(index)

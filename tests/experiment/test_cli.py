"""The `lape-kernels` command line on a tiny random model and a toy corpus: exit codes, outputs,
resume after an interruption (bit-exact), and bad inputs (one-line errors, nothing written)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lape_kernels.cli import main
from lape_kernels.experiment.toy import make_toy_setup

REPO = Path(__file__).resolve().parents[2]
LANGS = ["aa", "bb", "cc", "en"]
SMALL = ["--seq-len", "64"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    model, corpus = make_toy_setup(str(root))
    return {"root": root, "model": str(model), "corpus": str(corpus)}


@pytest.fixture(scope="module")
def pipeline(toy, tmp_path_factory):
    """collect -> identify once for the module (outputs checked in the tests below)."""
    out = tmp_path_factory.mktemp("pipe")
    stats, neurons = out / "stats", out / "neurons"
    rc = main(["collect", "--model", toy["model"], "--data", toy["corpus"], "--languages", *LANGS,
               "--tokens", "2048", "--batch-size", "8", "--save-every", "2", "-o", str(stats), *SMALL])
    assert rc == 0
    rc = main(["identify", str(stats), "--top-rate", "0.1", "-o", str(neurons)])
    assert rc == 0
    return {"stats": stats, "neurons": neurons, "dir": out}


def _run_cli(*args, env=None):
    """The real console entry point in a fresh process."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("LAPE_KERNELS_DEBUG", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "lape_kernels.cli", *args], capture_output=True, text=True, env=e,
                          cwd=str(REPO), timeout=300)


def _no_leftovers(path: Path) -> None:
    """Neither the output nor any temporary/partial sibling of it exists."""
    assert not path.exists(), f"{path} was written"
    siblings = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}") or
                p.name.startswith(f".{path.stem}.tmp")] if path.parent.exists() else []
    assert siblings == [], siblings


def _one_line_error(err: str, *needles: str) -> None:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert lines, "no error message"
    last = lines[-1]
    assert "error:" in last
    assert "Traceback" not in err
    for n in needles:
        assert n in last, (n, last)


# ----------------------------------------------------------------------------- collect / identify
def test_collect_writes_stats_per_language(pipeline):
    from lape_kernels.stats import StatsByLanguage

    stats = StatsByLanguage.load(pipeline["stats"])
    assert stats.languages == LANGS
    for lang in LANGS:
        s = stats[lang]
        assert s.n_tokens == 2048  # 32 packed rows of 64 tokens, no padding
        assert s.over_zero.shape == (2, 128)
        assert int(s.over_zero.max()) <= s.n_tokens
        assert s.meta["language"] == lang and s.meta["complete"] is True
        assert s.meta["sequences_done"] == 32
    assert not (pipeline["dir"] / ".stats.partial").exists()


def test_collect_matches_direct_record(toy, pipeline):
    """The CLI's counts equal a direct `record` over the same packed rows (decoder body only)."""
    from lape_kernels import introspection, patching
    from lape_kernels.data.packing import pack_tokens
    from lape_kernels.experiment.inputs import corpus_texts, load_corpus, load_model
    from lape_kernels.stats import StatsByLanguage, record

    model, tok = load_model(toy["model"], torch.float32, torch.device("cpu"))
    corpus = load_corpus(toy["corpus"], ["bb"])
    ids = pack_tokens(tok, corpus_texts(corpus, "bb", "train"), 64, add_bos=True, max_tokens=2048)
    with torch.no_grad(), record(model) as s:
        introspection.decoder_body(model)(input_ids=ids)
    got = StatsByLanguage.load(pipeline["stats"])["bb"]
    assert got.n_tokens == s.n_tokens
    assert torch.equal(got.over_zero, s.over_zero)


def test_collect_resume_after_interruption(toy, pipeline, tmp_path, monkeypatch):
    """Stopped after the first saved chunk, a rerun continues and ends with the same counts."""
    import lape_kernels.experiment.collect as col
    from lape_kernels.stats import StatsByLanguage

    import lape_kernels.stats as st

    real_record = col.__dict__.get("record")

    calls = {"n": 0}
    orig = st.record

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # aa has 2 chunks (32 rows / (2 batches x 8)); stop inside bb's second
            raise KeyboardInterrupt
        return orig(*a, **k)

    out = tmp_path / "stats"
    args = ["collect", "--model", toy["model"], "--data", toy["corpus"], "--languages", *LANGS, "--tokens", "2048",
            "--batch-size", "8", "--save-every", "2", "-o", str(out), *SMALL]
    monkeypatch.setattr(st, "record", flaky)
    assert main(args) == 130
    monkeypatch.setattr(st, "record", orig)
    assert not out.exists()
    partial = tmp_path / ".stats.partial"
    assert (partial / "aa.safetensors").exists() and (partial / "bb.safetensors").exists()
    assert main(args) == 0
    assert not partial.exists()
    a, b = StatsByLanguage.load(out), StatsByLanguage.load(pipeline["stats"])
    for lang in LANGS:
        assert a[lang].equal(b[lang]), lang
    assert real_record is None  # collect imports record lazily (the monkeypatch above relies on it)


def test_identify_prints_table_and_formats(pipeline, tmp_path, capsys):
    from lape_kernels.neurons import NeuronSet

    ns = NeuronSet.load(pipeline["neurons"])
    assert ns.languages == LANGS and ns.num_layers == 2 and ns.intermediate_size == 128
    assert sum(ns.total(l) for l in LANGS) > 0
    ref = tmp_path / "ref.pt"
    capsys.readouterr()
    assert main(["identify", str(pipeline["stats"]), "--top-rate", "0.1", "--format", "reference", "-o", str(ref)]) == 0
    printed = capsys.readouterr().out
    assert "| layer | aa | bb | cc | en |" in printed and "| total |" in printed
    back = NeuronSet.load(ref, languages=LANGS, intermediate_size=128)
    assert back == ns
    # single stats files + a language subset
    sub = tmp_path / "sub"
    files = [str(pipeline["stats"] / f"{l}.safetensors") for l in ("aa", "bb")]
    assert main(["identify", *files, "--top-rate", "0.1", "-o", str(sub)]) == 0
    assert NeuronSet.load(sub).languages == ["aa", "bb"]


# ----------------------------------------------------------------------------- finetune / eval
def _finetune_args(toy, neurons, out, method="neurons", steps=6, extra=()):
    return ["finetune", "--model", toy["model"], "--data", toy["corpus"], "--language", "aa", "--method", method,
            "--neurons", str(neurons), "--steps", str(steps), "--batch-size", "4", "--eval-every", "2",
            "--val-tokens", "256", "-o", str(out), *SMALL, *extra]


@pytest.mark.parametrize("method", ["neurons", "full", "lora"])
def test_resume_is_bit_exact(toy, pipeline, tmp_path, method, capsys):
    """Interrupted after 3 of 6 steps and rerun = uninterrupted: same losses, same best weights."""
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_finetune_args(toy, pipeline["neurons"], a, method)) == 0
    assert main(_finetune_args(toy, pipeline["neurons"], b, method, extra=["--stop-after-steps", "3"])) == 3
    err = capsys.readouterr().err
    assert "stopped after 3 of 6 steps" in err
    assert not b.exists() and (tmp_path / ".b.partial" / "checkpoint").is_dir()
    assert main(_finetune_args(toy, pipeline["neurons"], b, method)) == 0
    assert not (tmp_path / ".b.partial").exists() and not (b / "checkpoint").exists()
    log_a = [json.loads(l) for l in (a / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(l) for l in (b / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == list(range(1, 7))
    for ra, rb in zip(log_a, log_b):
        assert ra["loss"] == rb["loss"] and ra.get("val_loss") == rb.get("val_loss")
    files = sorted(p.name for p in (a / "best").iterdir() if p.suffix == ".safetensors")
    assert files and files == sorted(p.name for p in (b / "best").iterdir() if p.suffix == ".safetensors")
    for f in files:
        ta, tb = load_file(str(a / "best" / f)), load_file(str(b / "best" / f))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), k
    run_a, run_b = (json.loads((d / "run.json").read_text()) for d in (a, b))
    assert run_a["best"] == run_b["best"] and run_a["config_hash"] == run_b["config_hash"]


def test_recompute_flag_trains_the_same_weights(toy, pipeline, tmp_path, capsys):
    """--recompute up/gate_up changes memory and time only: same losses, same saved neurons."""
    from safetensors.torch import load_file

    runs = {}
    for mode in ("none", "gate_up"):
        out = tmp_path / mode
        assert main(_finetune_args(toy, pipeline["neurons"], out, steps=3, extra=["--recompute", mode])) == 0
        log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
        files = sorted(p for p in (out / "best").iterdir() if p.suffix == ".safetensors")
        runs[mode] = ([r["loss"] for r in log], {f.name: load_file(str(f)) for f in files})
    assert runs["none"][0] == runs["gate_up"][0]
    assert runs["none"][1].keys() == runs["gate_up"][1].keys() and runs["none"][1]
    for name, tensors in runs["none"][1].items():
        for k, t in tensors.items():
            assert torch.equal(t, runs["gate_up"][1][name][k]), (name, k)
    out = tmp_path / "bad"
    _bad(capsys, _finetune_args(toy, pipeline["neurons"], out, "full", extra=["--recompute", "up"]), out,
         "--recompute applies to --method neurons/random")


def test_finetune_methods_and_eval(toy, pipeline, tmp_path, capsys):
    """Every method trains what it should, and eval's after-perplexity of the target equals the
    run's own final validation perplexity (two code paths, one number)."""
    from lape_kernels.neurons import NeuronSet

    ns = NeuronSet.load(pipeline["neurons"])
    hidden, total_params = 64, None
    runs = {}
    for method in ("neurons", "random", "ffn", "full", "lora"):
        out = tmp_path / method
        assert main(_finetune_args(toy, pipeline["neurons"], out, method, steps=2)) == 0
        runs[method] = json.loads((out / "run.json").read_text())
        r = runs[method]
        assert r["complete"] and r["method"] == method and r["steps"] == 2 and r["tokens_trained"] == 2 * 4 * 64
        assert r["peak_memory_bytes"] > 0 and r["peak_memory_kind"] == "rss"
        assert r["mean_step_time_s"] > 0 and r["tokens_per_s"] > 0
        total_params = total_params or r["total_params"]
        assert r["total_params"] == total_params  # the base model's size, whatever is trained
    assert runs["neurons"]["trainable_params"] == 3 * hidden * ns.total("aa")
    assert runs["random"]["trainable_params"] == runs["neurons"]["trainable_params"]
    assert runs["random"]["neurons_per_layer"] != runs["neurons"]["neurons_per_layer"] or \
        runs["random"]["neuron_set_digest"] != runs["neurons"]["neuron_set_digest"]
    assert runs["ffn"]["trainable_params"] == 2 * 3 * 64 * 128
    assert runs["full"]["trainable_params"] == total_params
    assert runs["lora"]["trainable_params"] == 2 * 32 * (64 + 128) * 3
    # same data order for every method: the first step's loss is the same base-model loss
    first = {m: json.loads((tmp_path / m / "log.jsonl").read_text().splitlines()[0])["loss"] for m in runs}
    assert len({round(v, 6) for v in first.values()}) == 1, first

    for method in ("neurons", "full", "lora"):
        ev = tmp_path / f"{method}.json"
        assert main(["eval", "--model", toy["model"], "--data", toy["corpus"], "--languages", *LANGS,
                     "--target", "aa", "--run", str(tmp_path / method), "--val-tokens", "256", "--parallel", "8",
                     "-o", str(ev), *SMALL]) == 0
        e = json.loads(ev.read_text())
        assert set(e["before"]["ppl"]) == set(LANGS) and set(e["after"]["ppl"]) == set(LANGS)
        assert e["after"]["ppl"]["aa"] == pytest.approx(runs[method]["final"]["val_ppl"], rel=1e-5)
        assert e["target_ppl_change"] == pytest.approx(e["after"]["ppl"]["aa"] / e["before"]["ppl"]["aa"] - 1)
        assert len(e["before"]["alignment"]) == 3 and len(e["after"]["alignment"]) == 3  # embeddings + 2 layers
        assert all(-1.0 <= c <= 1.0 for c in e["after"]["alignment"])
        norms = e["update_norms"]["per_layer"]
        if method == "neurons":
            for li, counts in enumerate(ns.layer_counts("aa")):
                assert (norms[li]["mlp"] > 0) == (counts > 0)
                assert norms[li]["attention"] == 0.0
            assert e["update_norms"]["other"] == {}
        if method == "full":
            assert all(n["mlp"] > 0 and n["attention"] > 0 for n in norms)
        if method == "lora":
            assert all(n["mlp"] > 0 and n["attention"] == 0.0 for n in norms)
    # the base model alone
    ev = tmp_path / "base.json"
    assert main(["eval", "--model", toy["model"], "--data", toy["corpus"], "--languages", "aa", "bb", "--target", "aa",
                 "--val-tokens", "256", "--parallel", "0", "-o", str(ev), *SMALL]) == 0
    e = json.loads(ev.read_text())
    assert "after" not in e and e["before"]["alignment"] is None


def test_finetune_rerun_same_settings_is_a_no_op(toy, pipeline, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_finetune_args(toy, pipeline["neurons"], out, steps=2)) == 0
    before = (out / "run.json").read_text()
    capsys.readouterr()
    assert main(_finetune_args(toy, pipeline["neurons"], out, steps=2)) == 0
    assert "already complete" in capsys.readouterr().err
    assert (out / "run.json").read_text() == before
    # other settings: refused without --overwrite, replaced with it
    assert main(_finetune_args(toy, pipeline["neurons"], out, steps=3)) == 1
    assert "exists" in capsys.readouterr().err
    assert main(_finetune_args(toy, pipeline["neurons"], out, steps=3, extra=["--overwrite"])) == 0
    assert json.loads((out / "run.json").read_text())["steps"] == 3


def test_failure_mid_training_leaves_nothing(toy, pipeline, tmp_path, monkeypatch, capsys):
    import lape_kernels.experiment.finetune as ft

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ft, "save_artifact", boom)
    out = tmp_path / "run"
    assert main(_finetune_args(toy, pipeline["neurons"], out, steps=2)) == 1
    _one_line_error(capsys.readouterr().err, "disk on fire")
    _no_leftovers(out)


# ----------------------------------------------------------------------------- bad inputs
def _bad(capsys, args, out, *needles):
    rc = main(args)
    assert rc != 0
    _one_line_error(capsys.readouterr().err, *needles)
    _no_leftovers(Path(out))


def test_unknown_language(toy, pipeline, tmp_path, capsys):
    out = tmp_path / "o"
    _bad(capsys, ["collect", "--model", toy["model"], "--data", toy["corpus"], "--languages", "aa", "qq",
                  "--tokens", "512", "-o", str(out), *SMALL], out, "qq", "available: aa, bb, cc, en")
    args = _finetune_args(toy, pipeline["neurons"], out)
    args[args.index("--language") + 1] = "qq"
    _bad(capsys, args, out, "qq")
    ev = tmp_path / "e.json"
    _bad(capsys, ["eval", "--model", toy["model"], "--data", toy["corpus"], "--languages", "aa", "--target", "qq",
                  "-o", str(ev), *SMALL], ev, "qq")
    _bad(capsys, ["identify", str(pipeline["stats"]), "--languages", "aa", "qq", "-o", str(out)], out, "qq")


def test_reference_format_neuron_file(toy, pipeline, tmp_path, capsys):
    """A LAPE reference file carries no names: --neuron-languages names them (file order)."""
    ref = tmp_path / "ref.pt"
    assert main(["identify", str(pipeline["stats"]), "--top-rate", "0.1", "--format", "reference", "-o", str(ref)]) == 0
    out = tmp_path / "o"
    _bad(capsys, _finetune_args(toy, ref, out, "random"), out, "no language 'aa'", "lang0")
    args = _finetune_args(toy, ref, out, "random", steps=1, extra=["--neuron-languages", *LANGS])
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    from lape_kernels.neurons import NeuronSet

    assert run["neuron_count"] == NeuronSet.load(pipeline["neurons"]).total("aa")


def test_language_missing_from_neuron_set(toy, pipeline, tmp_path, capsys):
    from lape_kernels.neurons import NeuronSet

    ns = NeuronSet.load(pipeline["neurons"])
    only_bb = tmp_path / "bb_only"
    NeuronSet({"bb": ns["bb"]}, ns.num_layers, ns.intermediate_size).save(only_bb)
    out = tmp_path / "o"
    _bad(capsys, _finetune_args(toy, only_bb, out), out, "no language 'aa'")


def test_empty_corpus(toy, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "aa.txt").write_text((Path(toy["corpus"]) / "aa.txt").read_text())
    (corpus / "zz.txt").write_text("\n\n   \n")
    (corpus / "yy.txt").write_text("".join(f"short line {i}\n" for i in range(30)))
    out = tmp_path / "o"
    _bad(capsys, ["collect", "--model", toy["model"], "--data", str(corpus), "--languages", "aa", "zz",
                  "--tokens", "512", "-o", str(out), *SMALL], out, "zz")
    _bad(capsys, ["finetune", "--model", toy["model"], "--data", str(corpus), "--language", "yy", "--method", "full",
                  "--steps", "1", "-o", str(out), "--seq-len", "512"], out, "yy", "too little text")
    _bad(capsys, ["collect", "--model", toy["model"], "--data", str(tmp_path / "nothing"), "--languages", "aa",
                  "--tokens", "512", "-o", str(out), *SMALL], out, "nothing")


def test_neuron_set_that_does_not_fit(toy, tmp_path, capsys):
    from lape_kernels.neurons import NeuronSet

    three_layers = tmp_path / "n3"
    NeuronSet({"aa": [torch.tensor([1, 2])] * 3}, 3, 128).save(three_layers)
    too_wide = tmp_path / "wide"
    NeuronSet({"aa": [torch.tensor([5]), torch.tensor([300])]}, 2, 512).save(too_wide)
    out = tmp_path / "o"
    for bad in (three_layers, too_wide):
        for method in ("neurons", "random"):
            _bad(capsys, _finetune_args(toy, bad, out, method), out, "does not fit the model")
    _bad(capsys, _finetune_args(toy, tmp_path / "missing", out), out, "missing")


def test_unsupported_model_family(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lape_kernels.testing import tiny_tokenizer

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=256, n_positions=128)).save_pretrained(gpt2)
    tiny_tokenizer().save_pretrained(gpt2)
    corpus = tmp_path / "c"
    make_toy_setup(str(tmp_path / "toy2"))
    out = tmp_path / "o"
    _bad(capsys, ["collect", "--model", str(gpt2), "--data", str(tmp_path / "toy2" / "corpus"), "--languages", "aa",
                  "bb", "--tokens", "512", "-o", str(out), *SMALL], out, "gpt2", "has no gated MLP",
         "lape_kernels.check_model(model)")
    assert not corpus.exists()


def test_bad_flags_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--model", "x", "--language", "aa", "--method", "magic", "--steps", "1", "-o", "o"])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, "magic")
    with pytest.raises(SystemExit) as exc:
        main(["identify", "s", "--top-rate", "1.5", "-o", "o"])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, "1.5")
    assert main(["finetune", "--model", "x", "--language", "aa", "--method", "neurons", "--steps", "1",
                 "-o", "o"]) == 1
    _one_line_error(capsys.readouterr().err, "needs --neurons")


def test_console_script_process(toy, tmp_path):
    """The real process: a bad input exits non-zero with one line and no traceback; a good one works."""
    out = tmp_path / "o"
    p = _run_cli("collect", "--model", toy["model"], "--data", toy["corpus"], "--languages", "aa", "xx",
                 "--tokens", "512", "-o", str(out), *SMALL)
    assert p.returncode == 1
    _one_line_error(p.stderr, "xx")
    assert len([l for l in p.stderr.splitlines() if l.strip()]) == 1, p.stderr
    _no_leftovers(out)
    p = _run_cli("--help")
    assert p.returncode == 0 and "collect" in p.stdout and "demo" in p.stdout

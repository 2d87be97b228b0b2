"""The experiment's configs drive the command line (every field an option with its default and
help; a new field is a new option with nothing else touched), save and load themselves; the run
directory (runs.py) reads back what it wrote."""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest
import torch

from lape_kernels import cli
from lape_kernels.experiment import config as C
from lape_kernels.experiment.errors import ExperimentError

CONFIGS = {name: getattr(C, cls) for name, (cls, _) in cli.COMMANDS.items()}


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_field_is_an_option_with_its_default_and_help(command):
    cls = CONFIGS[command]
    actions = {a.dest: a for a in _subparser(command)._actions if a.dest != "help"}
    cli_fields = [f for f in dataclasses.fields(cls) if f.metadata["cli"]]
    assert {f.name for f in dataclasses.fields(cls)} - {f.name for f in cli_fields} <= {"quiet"}
    assert set(actions) == {f.name for f in cli_fields}
    for f in cli_fields:
        a = actions[f.name]
        assert a.help and f.metadata["help"] in a.help, f.name
        if f.default is not dataclasses.MISSING:
            assert a.default == f.default and not a.required, f.name
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            assert a.default == f.default_factory(), f.name  # type: ignore[misc]
        elif not f.metadata["group"] and a.option_strings:
            assert a.required, f.name


def test_parsed_command_line_is_the_config_with_defaults():
    args = cli.build_parser().parse_args(["finetune", "--model", "m", "--language", "cy", "--method", "neurons",
                                          "--neurons", "n", "--steps", "3", "-o", "out", "--eval-at-start",
                                          "--neuron-languages", "a", "b", "--lr", "0.5"])
    cfg = C.from_args(C.FinetuneConfig, args)
    want = C.FinetuneConfig(model="m", language="cy", method="neurons", out="out", neurons="n", steps=3,
                            eval_at_start=True, neuron_languages=["a", "b"], lr=0.5)
    assert cfg == want
    ev = C.from_args(C.EvalConfig, cli.build_parser().parse_args(
        ["eval", "--model", "m", "--languages", "a", "b", "--target", "a", "--parallel", "0", "-o", "e.json"]))
    assert ev == C.EvalConfig(model="m", languages=["a", "b"], target="a", out="e.json", parallel_n=0)
    assert "parallel_n" in ev.evaluator_settings() and "out" not in ev.evaluator_settings()


def test_budget_is_one_of_tokens_or_steps(capsys):
    base = ["finetune", "--model", "m", "--language", "cy", "--method", "full", "-o", "o"]
    for extra in ([], ["--tokens", "10", "--steps", "2"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(base + extra)
        assert exc.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_new_field_becomes_an_option_without_touching_the_cli():
    @dataclass
    class Extended(C.FinetuneConfig):
        new_knob: int = C.setting(7, type=C.positive_int, help="a setting added in one place")
        tags: Optional[List[str]] = C.setting(None, help="several words")
        on: bool = C.setting(False, help="a switch")

    parser = C.add_options(argparse.ArgumentParser(), Extended)
    args = parser.parse_args(["--model", "m", "--language", "cy", "--method", "full", "-o", "o", "--steps", "1",
                              "--new-knob", "9", "--tags", "x", "y", "--on"])
    cfg = C.from_args(Extended, args)
    assert (cfg.new_knob, cfg.tags, cfg.on) == (9, ["x", "y"], True)
    assert C.from_args(Extended, parser.parse_args(["--model", "m", "--language", "cy", "--method", "full",
                                                    "-o", "o", "--tokens", "5"])).new_knob == 7
    assert "a setting added in one place (default: 7)" in parser.format_help().replace("\n", " ").replace("  ", " ")
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--language", "cy", "--method", "full", "-o", "o", "--steps", "1",
                           "--new-knob", "0"])


@pytest.mark.parametrize("cfg", [
    C.FinetuneConfig(model="m", language="cy", method="neurons", out="o", neurons="n", steps=3, lr=2e-4,
                     neuron_languages=["a", "b"], eval_at_start=True),
    C.CollectConfig(model="m", languages=["a", "b"], out="s", tokens=10),
    C.IdentifyConfig(stats=["s1", "s2"], out="n", top_rate=0.05),
    C.EvalConfig(model="m", languages=["a"], target="a", out="e", run="r"),
    C.DemoConfig(full=True, methods=["neurons"], config_path="c.json"),
])
def test_config_save_load_round_trip(cfg, tmp_path):
    path = cfg.save(tmp_path / "cfg.json")
    back = type(cfg).load(path)
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_load_refuses_foreign_and_unknown(tmp_path):
    p = C.CollectConfig(model="m", languages=["a"], out="s").save(tmp_path / "c.json")
    with pytest.raises(ExperimentError, match="holds a CollectConfig, not a FinetuneConfig"):
        C.FinetuneConfig.load(p)
    blob = json.loads(p.read_text())
    blob["config"]["lernrate"] = 3
    p.write_text(json.dumps(blob))
    with pytest.raises(ExperimentError, match=r"c\.json: unknown settings \['lernrate'\]"):
        C.CollectConfig.load(p)
    (tmp_path / "x.json").write_text("[1]")
    with pytest.raises(ExperimentError, match="not a lape_kernels config file"):
        C.CollectConfig.load(tmp_path / "x.json")


def test_identity_ignores_what_does_not_change_the_result():
    a = C.FinetuneConfig(model="m", language="cy", method="full", out="a", steps=2)
    b = dataclasses.replace(a, out="b", overwrite=True, cache_dir="c", save_every=1, recompute="up")
    assert a.identity() == b.identity() and a.identity()["lr"] == C.DEFAULT_LR["full"]
    assert a.identity() != dataclasses.replace(a, seed=1).identity()


# ----------------------------------------------------------------------------- runs.py
def test_run_directory_round_trip(tmp_path):
    """A run's weights artifact and checkpoint read back exactly; apply_run merges what was saved."""
    from lape_kernels.experiment import runs
    from lape_kernels.testing import tiny_model

    model = tiny_model("llama", seed=0, num_layers=2)
    for p in model.parameters():
        p.requires_grad_(False)
    mlp = model.model.layers[1].mlp
    mlp.up_proj.weight.requires_grad_(True)
    with torch.no_grad():
        mlp.up_proj.weight.add_(1.0)
    run = tmp_path / "run"
    runs.save_artifact(model, "ffn", run / "best")
    info = {"format": runs.RUN_FORMAT, "complete": True, "config_hash": "h", "artifact": "best",
            "artifact_format": runs.ARTIFACT_FORMAT["ffn"], "language": "cy"}
    (run / "run.json").write_text(json.dumps(info))
    assert runs.load_run_info(run) == info
    assert runs.complete_run(run, "h") == info and runs.complete_run(run, "other") is None
    fresh = tiny_model("llama", seed=0, num_layers=2)
    merged = runs.apply_run(fresh, run)
    for (n, a), (_, b) in zip(model.named_parameters(), merged.named_parameters()):
        assert torch.equal(a, b), n

    opt = torch.optim.AdamW([mlp.up_proj.weight], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    mlp.up_proj.weight.sum().backward()
    opt.step()
    runs.save_checkpoint(model, opt, sched, 5, {"best": None, "step_times": [0.5]}, run / "checkpoint")
    want = mlp.up_proj.weight.detach().clone()
    with torch.no_grad():
        mlp.up_proj.weight.zero_()
    opt2 = torch.optim.AdamW([mlp.up_proj.weight], lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    step, state = runs.load_checkpoint(model, opt2, sched2, run / "checkpoint")
    assert step == 5 and state == {"best": None, "step_times": [0.5]}
    assert torch.equal(mlp.up_proj.weight, want)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_run_directory_refusals(tmp_path):
    from lape_kernels.experiment import runs

    with pytest.raises(ExperimentError, match="not a finished run"):
        runs.load_run_info(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"format": "other", "complete": True}))
    with pytest.raises(ExperimentError, match="not a complete lape_kernels run"):
        runs.load_run_info(tmp_path)

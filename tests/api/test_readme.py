"""The README's Python blocks run as written, in a fresh interpreter, so the README cannot drift
from the code. The one change: the real model the README loads is replaced by a tiny one of the
same family (``SUBSTITUTIONS``, each of which must occur in the README)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"

#: README text -> what the test runs instead (no network, seconds on a CPU). varied_signs=False:
#: transformers' own init, whose activation probabilities stay below 1 on a short batch, as a
#: real model's do, so identify selects neurons for both languages
SUBSTITUTIONS = {
    'load_model("gemma3-270m")': '(tiny_model("gemma3_text", varied_signs=False), tiny_tokenizer())',
}
PRELUDE = "from lape_kernels.testing import tiny_model, tiny_tokenizer\n"

# The blocks are one session, read top to bottom (a later block uses the first block's model).
# The session runs twice in one interpreter (fresh globals, fresh working directory): a public
# name that works only once (the old lazy-import bug) fails the second run.
_RUNNER = r'''
import json, os, sys
blocks = json.loads(sys.stdin.read())
for run in ("first", "second"):
    os.makedirs(run)
    os.chdir(run)
    namespace = {"__name__": "__main__"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)
        print("@@readme", run, i, "ok", json.dumps(sorted(k for k in namespace if not k.startswith("__"))))
    os.chdir("..")
'''


def readme_blocks():
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    assert blocks, "README.md has no ```python block"
    return blocks


def runnable(blocks):
    out = []
    for block in blocks:
        for old, new in SUBSTITUTIONS.items():
            block = block.replace(old, new)
        out.append(PRELUDE + block)
    return out


def test_every_substitution_applies():
    text = "".join(readme_blocks())
    missing = [old for old in SUBSTITUTIONS if old not in text]
    assert not missing, f"README no longer contains {missing}: update SUBSTITUTIONS with the README"


def test_readme_python_blocks_run_in_a_fresh_interpreter(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(runnable(readme_blocks())),
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the runner's own lines (the README's blocks print too)
    lines = [ln.split(None, 1)[1] for ln in proc.stdout.splitlines() if ln.startswith("@@readme ")]
    assert [ln.split()[:3] for ln in lines] == [[run, str(i), "ok"] for run in ("first", "second")
                                                for i in range(len(readme_blocks()))]
    # what the quick-start block promises: trained neurons saved for the model it ran on
    for run in ("first", "second"):
        config = json.loads((tmp_path / run / "cy-neurons" / "lape_config.json").read_text())
        assert config["language"] == "cy" and config["total_neurons"] > 0
        assert config["model_fingerprint"].startswith("v1:")


@pytest.mark.parametrize("block", range(len(readme_blocks())))
def test_readme_block_uses_the_public_names(block):
    """The blocks call the library through ``lape_kernels.<name>`` (the README's promise) and
    every such name is public."""
    import lape_kernels

    used = set(re.findall(r"\blape_kernels\.([A-Za-z_]+)\b", readme_blocks()[block])) - {"data", "testing"}
    assert used and used <= set(lape_kernels.__all__), used - set(lape_kernels.__all__)

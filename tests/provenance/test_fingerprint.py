"""model_fingerprint: one value per model's weights, whatever directory, device or bf16/fp32 copy."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from conftest import named_model

import lape_kernels as lk
from lape_kernels import fingerprint as fp_module
from lape_kernels.introspection import decoder_layers
from lape_kernels.testing import TINY_FAMILIES, random_neurons, tiny_gemma3_multimodal, tiny_model


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def test_same_model_moved_to_another_directory_keeps_its_fingerprint(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(str(tmp_path / "a"))
    first = _load(tmp_path / "a")
    shutil.move(str(tmp_path / "a"), str(tmp_path / "moved"))
    moved = _load(tmp_path / "moved")
    assert first.config._name_or_path != moved.config._name_or_path
    assert lk.model_fingerprint(first) == lk.model_fingerprint(moved) == lk.model_fingerprint(model)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_same_arguments_same_fingerprint_other_seed_other_fingerprint(family):
    a = lk.model_fingerprint(tiny_model(family))
    assert a == lk.model_fingerprint(tiny_model(family))
    assert a.startswith(f"v{fp_module.FINGERPRINT_VERSION}:") and len(a) == 3 + 32
    assert a != lk.model_fingerprint(tiny_model(family, seed=1))


def test_two_families_of_one_shape_differ():
    prints = {lk.model_fingerprint(tiny_model(f, varied_signs=False)) for f in ("llama", "mistral", "qwen2")}
    assert len(prints) == 3  # the config's model_type is hashed


def test_a_changed_weight_tensor_changes_it():
    model = tiny_model("qwen2")
    before = lk.model_fingerprint(model)
    with torch.no_grad():
        decoder_layers(model)[1][1].mlp.down_proj.weight.mul_(1.01)  # as any fine-tuning of one tensor
    assert lk.model_fingerprint(model) != before


def test_one_sampled_value_changed_by_one_bf16_ulp_changes_it():
    model = tiny_model("llama", dtype=torch.bfloat16)
    before = lk.model_fingerprint(model)
    w = decoder_layers(model)[1][2].self_attn.o_proj.weight
    pos = fp_module._positions(w.numel())[5]
    with torch.no_grad():
        bits = w.view(-1).view(torch.int16)
        bits[pos] += 1  # the next bf16 value
    assert lk.model_fingerprint(model) != before


def test_a_value_outside_the_sample_is_not_seen():
    """The documented limit: a guard against mixed-up models, not an integrity hash."""
    model = tiny_model("llama")
    before = lk.model_fingerprint(model)
    w = decoder_layers(model)[1][0].mlp.gate_proj.weight
    sampled = set(fp_module._positions(w.numel()))
    outside = next(i for i in range(w.numel()) if i not in sampled)
    with torch.no_grad():
        w.view(-1)[outside] += 1.0
    assert lk.model_fingerprint(model) == before


def test_bf16_copy_keeps_it_fp16_copy_does_not():
    """Decision (documented in lape_kernels/fingerprint.py): the sample is compared at bf16
    precision, so an fp32 model and its bf16 copy are one model; fp16 rounds differently."""
    fp32 = tiny_model("gemma3_text")
    print32 = lk.model_fingerprint(fp32)
    assert lk.model_fingerprint(tiny_model("gemma3_text", dtype=torch.bfloat16)) == print32
    assert lk.model_fingerprint(tiny_model("gemma3_text", dtype=torch.float16)) != print32
    # a bf16 model loaded in fp32 is exact, so it agrees as well
    assert lk.model_fingerprint(tiny_model("gemma3_text", dtype=torch.bfloat16).float()) == print32


def test_two_models_of_one_shape_differ_and_names_do_not_matter():
    base, other = named_model("same/name", seed=0), named_model("same/name", seed=1)
    assert lk.model_fingerprint(base) != lk.model_fingerprint(other)
    renamed = named_model("another/name", seed=0)
    assert lk.model_fingerprint(renamed) == lk.model_fingerprint(base)


def test_trainable_slices_are_not_the_model_but_merge_is():
    model = tiny_model("phi3")
    before = lk.model_fingerprint(model)
    lk.patch(model, neurons=random_neurons(3, 96, 4))
    with torch.no_grad():
        for p in lk.trainable_parameters(model):
            p.add_(1.0)
    assert lk.model_fingerprint(model) == before
    lk.merge(model)
    assert lk.model_fingerprint(model) != before


def test_multimodal_wrapper_and_its_language_model_agree():
    """Names are relative to the decoder layer: the text model inside a multimodal wrapper has
    the wrapper's fingerprint."""
    mm = tiny_gemma3_multimodal()
    assert lk.model_fingerprint(mm) == lk.model_fingerprint(mm.model.language_model)


def test_compiled_wrapper_has_the_models_fingerprint():
    model = tiny_model("qwen3")
    assert lk.model_fingerprint(torch.compile(model)) == lk.model_fingerprint(model)


def test_unreadable_weights_give_none():
    from transformers import AutoModelForCausalLM

    from lape_kernels.testing import tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert lk.model_fingerprint(model) is None


def test_fingerprint_is_pinned():
    """Stored files compare against this value: a change of the algorithm must bump
    FINGERPRINT_VERSION (and this test), never change silently. Weights set by arithmetic, so
    the value depends only on the config fields and the algorithm."""
    model = tiny_model("llama", varied_signs=False)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            n = p.numel()
            p.copy_(((torch.arange(n, dtype=torch.float64) * (i + 3)) % 17 - 8).reshape(p.shape) / 64)
    assert lk.model_fingerprint(model) == PINNED


PINNED = "v1:239438bb695437d822914a4b909b3ea4"


_SHARDED = r'''
import sys, tempfile, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import lape_kernels as lk
from lape_kernels.introspection import decoder_layers
from lape_kernels.testing import tiny_model
dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/pg", rank=0, world_size=1)
model = tiny_model("llama")
for layer in decoder_layers(model)[1]:
    fully_shard(layer)
plain = tiny_model("llama")
ddp = torch.nn.parallel.DistributedDataParallel(plain)
print(lk.model_fingerprint(ddp) == lk.model_fingerprint(plain))
fully_shard(model)
print(lk.model_fingerprint(model))
dist.destroy_process_group()
'''


def test_ddp_wrapper_is_transparent_sharded_model_is_unknown():
    """DDP adds a wrapper without config: the fingerprint is the wrapped model's. FSDP2
    parameters are DTensors: reading them would need every process; None instead."""
    proc = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "None"]  # DDP: the wrapped model's; FSDP2: unknown

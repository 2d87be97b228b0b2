"""Discovery by structure, proven by probing: layouts read from what the module computes (not its
names), and every MLP that is gated-shaped but computes something else refused with the reason."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lape_kernels as lk
from lape_kernels import introspection, model_matrix, patching
from lape_kernels.introspection import MLPFamily, UnsupportedModelError

H, I = 64, 128


class _FusedMLP(nn.Module):
    """A fused gate/up MLP whose layout is a constructor argument (the names say nothing)."""

    def __init__(self, layout: str, act: nn.Module):
        super().__init__()
        self.layout = layout
        self.proj_in = nn.Linear(H, 2 * I, bias=True)
        self.proj_out = nn.Linear(I, H, bias=False)
        self.nonlin = act

    def forward(self, x):
        y = self.proj_in(x)
        if self.layout == "gate_up":
            gate, up = y.chunk(2, dim=-1)
        elif self.layout == "up_gate":
            up, gate = y.chunk(2, dim=-1)
        elif self.layout == "interleaved":
            gate, up = y[..., 0::2], y[..., 1::2]
        else:
            up, gate = y[..., 0::2], y[..., 1::2]
        return self.proj_out(up * self.nonlin(gate))


class _SwappedNamesMLP(nn.Module):
    """Separate projections whose names lie: ``gate_proj`` is the up projection."""

    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


class _GptOssMathMLP(nn.Module):
    """gpt-oss's expert math on a dense MLP: interleaved halves, clamps, alpha-scaled sigmoid and
    (up + 1): structurally a fused gated MLP with a SiLU-like activation, but not our function."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Linear(H, 2 * I, bias=True)
        self.down_proj = nn.Linear(I, H, bias=True)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        gu = self.gate_up_proj(x)
        gate, up = gu[..., ::2].clamp(max=7.0), gu[..., 1::2].clamp(-7.0, 7.0)
        glu = gate * torch.sigmoid(gate * 1.702)
        return self.down_proj((up + 1) * glu)


class _ClampOnlyMLP(_SwappedNamesMLP):
    """Our math except for a clamp that only large inputs reach."""

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)).clamp(max=7.0) * self.up_proj(x))


def _llama_with(mlp_factory, num_layers: int = 2):
    model = model_matrix.tiny_model_of_type("llama")
    g = torch.Generator().manual_seed(3)
    for layer in model.model.layers:
        mlp = mlp_factory()
        with torch.no_grad():
            for p in mlp.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 10))
        layer.mlp = mlp
    return model.eval()


@pytest.mark.parametrize("layout", introspection.FUSED_LAYOUTS)
def test_fused_layout_is_detected_by_probing_and_every_check_passes(layout):
    model = _llama_with(lambda: _FusedMLP(layout, nn.SiLU()))
    found = lk.check_model(model)
    assert [m.family.fused_layout for m in found.mlps] == [layout, layout]
    assert found.mlps[0].family.gate_up_name == "proj_in" and found.mlps[0].family.down_name == "proj_out"
    assert found.mlps[0].activation == "silu" and "proj_in" in str(found)
    wg, wu, _ = found.mlps[0].family.weights(found.mlps[0].module)
    x = torch.randn(4, H)
    gate, up = found.mlps[0].family.gate_up(found.mlps[0].module, x)
    torch.testing.assert_close(gate, F.linear(x, wg, found.mlps[0].family.biases(found.mlps[0].module)[0]))
    assert gate.stride(-1) == 1 and up.stride(-1) == 1  # the kernels' contiguity requirement
    if layout.startswith("interleaved"):
        # The module applies its activation to a strided view, which ATen evaluates on its scalar
        # path; the kernels need a contiguous gate, evaluated on the vector path: last-bit
        # differences, so this layout (no dense transformers model uses it) is close, not identical.
        ids = torch.randint(3, 256, (2, 9))
        want = model(input_ids=ids).logits
        torch.testing.assert_close(lk.patch(copy.deepcopy(model))(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        checks = ("counts", "training")
    else:
        checks = tuple(model_matrix.CHECKS)
    for check in checks:
        model_matrix.run_check(check, model)


def test_interleaved_layout_counts_with_the_fused_gemm_path():
    model = _llama_with(lambda: _FusedMLP("interleaved", nn.SiLU()))
    ids = torch.randint(3, 256, (2, 9))
    other = copy.deepcopy(model)
    with lk.record(other) as plain:
        other(input_ids=ids)
    with lk.record(model, fused_gemm=True) as fused:
        model(input_ids=ids)
    assert torch.equal(plain.over_zero, fused.over_zero)


def test_lying_names_are_read_by_what_the_module_computes():
    model = _llama_with(_SwappedNamesMLP)
    family = lk.check_model(model).mlps[0].family
    assert (family.gate_name, family.up_name) == ("up_proj", "gate_proj")
    for check in model_matrix.CHECKS:
        model_matrix.run_check(check, model)


@pytest.mark.parametrize("factory, why", [
    (_GptOssMathMLP, r"_GptOssMathMLP.forward is not down\(act\(gate\(x\)\) \* up\(x\)\)"),
    (_ClampOnlyMLP, r"_ClampOnlyMLP.forward is not down\(act\(gate\(x\)\) \* up\(x\)\)"),
])
def test_gated_shape_with_other_math_is_refused(factory, why):
    model = _llama_with(factory)
    with pytest.raises(UnsupportedModelError, match=why):
        lk.patch(model)
    assert not lk.is_patched(model)
    assert not any("forward" in layer.mlp.__dict__ for layer in model.model.layers)


def _with_extra(name, module):
    def factory():
        mlp = _SwappedNamesMLP()
        setattr(mlp, name, module() if isinstance(module, type) else module)
        return mlp
    return factory


@pytest.mark.parametrize("extra, why", [
    (("scale", nn.Parameter(torch.ones(I))), r"own parameters \['scale'\]"),
    (("sub_norm", nn.LayerNorm(I)), r"sub_norm \(LayerNorm\) computes inside the MLP"),
    (("dropout", nn.Dropout(0.1)), r"Dropout\(p=0.1\)"),
])
def test_mlp_with_more_inside_is_refused(extra, why):
    model = _llama_with(_with_extra(*extra))
    with pytest.raises(UnsupportedModelError, match=why):
        lk.check_model(model)


def test_dropout_that_drops_nothing_is_accepted():
    model = _llama_with(_with_extra("dropout", nn.Dropout(0.0)))
    assert lk.check_model(model).mlps[0].activation == "silu"


def test_quantising_linear_is_refused():
    class QuantLinear(nn.Linear):
        def forward(self, x):
            return F.linear(x, self.weight.sign(), self.bias)

    def factory():
        mlp = _SwappedNamesMLP()
        mlp.down_proj = QuantLinear(I, H, bias=False)
        return mlp
    with pytest.raises(UnsupportedModelError, match="down_proj is a QuantLinear with its own forward"):
        lk.check_model(_llama_with(factory))


@pytest.mark.parametrize("act, why", [
    ("quick_gelu", r"activation QuickGELUActivation .*not one of our kernels'"),
    ("gelu_new", r"NewGELUActivation is GELU-tanh written as a Python formula"),
    ("gelu_python_tanh", r"GELUTanh evaluates a Python formula"),
    ("relu2", r"ReLUSquaredActivation"),
])
def test_activation_is_read_from_the_instance_and_unknown_ones_are_named(act, why):
    from transformers.activations import ACT2FN

    model = model_matrix.tiny_model_of_type("llama")
    model.model.layers[0].mlp.act_fn = ACT2FN[act]
    with pytest.raises(UnsupportedModelError, match=why):
        lk.patch(model)


@pytest.mark.parametrize("act, kernel", [(nn.SiLU(), "silu"), (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
                                         (F.silu, "silu")])
def test_known_activations_map_to_kernels(act, kernel):
    assert introspection.kernel_activation(act) == kernel


def test_shared_and_tied_mlps_are_refused():
    model = model_matrix.tiny_model_of_type("llama")
    model.model.layers[1].mlp = model.model.layers[0].mlp
    with pytest.raises(UnsupportedModelError, match="share one MLP module"):
        lk.check_model(model)
    model = model_matrix.tiny_model_of_type("llama")
    model.model.layers[1].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight
    with pytest.raises(UnsupportedModelError, match="share \\(tie\\) MLP weights"):
        lk.check_model(model)


def test_encoder_decoder_is_refused():
    import transformers as tf

    cfg = tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                      feed_forward_proj="gated-gelu")
    with pytest.raises(UnsupportedModelError, match="is an encoder-decoder"):
        lk.patch(tf.T5ForConditionalGeneration(cfg))


class _TwoMLPBlock(nn.Module):
    """A block with two gated-shaped children: discovery cannot choose, a registered family can."""

    def __init__(self, layer):
        super().__init__()
        self.inner = layer
        self.aux = _SwappedNamesMLP()
        self.main = layer.mlp

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_ambiguous_structure_needs_a_registered_family():
    model = model_matrix.tiny_model_of_type("llama")
    model.config.model_type = "two_mlp_test"
    for i, layer in enumerate(model.model.layers):
        model.model.layers[i] = _TwoMLPBlock(layer)
    with pytest.raises(UnsupportedModelError, match=r"several gated-MLP-shaped children .*register_family"):
        lk.check_model(model)
    family = introspection.register_family(MLPFamily("two_mlp_test", ("two_mlp_test",), ffn_name="main"))
    try:
        found = lk.check_model(model)
        assert [m.module for m in found.mlps] == [b.main for b in model.model.layers]
        ids = torch.randint(3, 256, (2, 7))
        want = model(input_ids=ids).logits
        lk.patch(model)
        assert torch.equal(model(input_ids=ids).logits, want)
        assert patching.patched_mlps(model) == [b.main for b in model.model.layers]
        lk.unpatch(model)
    finally:
        for t in family.model_types:
            introspection.FAMILIES.pop(t, None)


def test_registered_family_that_is_not_our_math_is_still_refused():
    model = _llama_with(_GptOssMathMLP)
    model.config.model_type = "override_test"
    introspection.register_family(MLPFamily("override_test", ("override_test",), gate_name=None, up_name=None,
                                            gate_up_name="gate_up_proj", fused_layout="interleaved"))
    try:
        with pytest.raises(UnsupportedModelError, match="is not down"):
            lk.check_model(model)
    finally:
        introspection.FAMILIES.pop("override_test", None)


def test_bad_family_definitions():
    with pytest.raises(ValueError, match="fused_layout"):
        MLPFamily("x", fused_layout="diagonal")
    with pytest.raises(ValueError, match="gate_name and up_name"):
        MLPFamily("x", gate_name=None)
    with pytest.raises(ValueError, match="names no model_types"):
        introspection.register_family(MLPFamily("x"))
    with pytest.raises(TypeError, match="MLPFamily"):
        introspection.register_family("llama")


def test_check_model_reports_what_it_found():
    found = lk.check_model(model_matrix.tiny_model_of_type("olmo2"))
    text = str(found)
    assert "olmo2" in text and "2 decoder layers at model.layers" in text and "activation silu" in text
    assert found.probed and [m.layer_index for m in found.mlps] == [0, 1]
    assert [m.path for m in found.mlps] == ["model.layers.0.mlp", "model.layers.1.mlp"]


def test_meta_device_model_is_read_from_unambiguous_names_only():
    with torch.device("meta"):
        import transformers as tf

        llama = tf.LlamaForCausalLM(model_matrix.tiny_config("llama"))
    found = introspection.discover(llama)
    assert not found.probed and "NOT probed" in str(found)
    assert found.mlps[0].family.gate_name == "gate_proj" and found.mlps[0].activation == "silu"
    with torch.device("meta"):
        fused = _llama_with(lambda: _FusedMLP("gate_up", nn.SiLU())).to("meta")
    with pytest.raises(UnsupportedModelError, match="meta device and its reading is ambiguous"):
        introspection.discover(fused)

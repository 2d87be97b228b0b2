"""The op test matrix: every op on every backend (tests/ops/backends.py) against the oracle
lape_kernels/reference.py, and one error model: the same bad arguments raise the same
exception with the same message on every backend, the fake (tracing) kernels included.

How values are compared: kernel_tolerance.check_op (bit-identical for the exact backends, the
documented error model for the others; counts are exact everywhere).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends import NAMES, make_backend, selected
from inputs import DTYPES, LAYOUTS, gate_up, lang_ids, randn, sorted_sel
from kernel_tolerance import check_op
from lape_kernels.kernels.checks import ACTIVATIONS

ELEMENTWISE = ("act_mul", "act_mul_count", "act_mul_backward", "act_mul_split", "act_mul_backward_split")


@pytest.fixture(params=NAMES, scope="module")
def backend(request):
    """Every backend, the reference included (the error model)."""
    b = make_backend(request.param)
    with selected(b):
        yield b


@pytest.fixture(params=[n for n in NAMES if n != "reference"], scope="module")
def kernels(request):
    """Every backend but the reference (values are compared with the reference)."""
    b = make_backend(request.param)
    with selected(b):
        yield b


def _examples(backend, n):
    """Hypothesis examples per backend: the Triton interpreter runs ~100x slower than the rest."""
    return max(4, n // 4) if backend.interpreted else n


def run_all_ops(backend, gate, up, activation, token_lang, num_langs, sel, seed):
    """Every elementwise op on (gate, up), checked against the reference, plus the backend's
    own consistency: the split ops' out_sel is exactly its act_mul at sel."""
    ops, dev = backend.ops, backend.device
    T, I = gate.shape
    check_op(backend, "act_mul", ops.act_mul(gate, up, activation), gate, up, activation)
    check_op(backend, "act_mul_count", ops.act_mul_count(gate, up, activation, token_lang, num_langs),
             gate, up, activation, token_lang, num_langs)
    grad_out = randn(T, I, dtype=gate.dtype, seed=seed + 2, device=dev)
    check_op(backend, "act_mul_backward", ops.act_mul_backward(grad_out, gate, up, activation),
             grad_out, gate, up, activation)
    split = ops.act_mul_split(gate, up, activation, sel)
    check_op(backend, "act_mul_split", split, gate, up, activation, sel)
    h = ops.act_mul(gate, up, activation)
    assert torch.equal(split[1], h[:, sel])
    gos = randn(T, sel.numel(), dtype=gate.dtype, seed=seed + 3, device=dev)
    bsplit = ops.act_mul_backward_split(grad_out, gos, gate, up, activation, sel)
    check_op(backend, "act_mul_backward_split", bsplit, grad_out, gos, gate, up, activation, sel)
    assert torch.equal(bsplit[4], h[:, sel])


# --------------------------------------------------------------------------- values --


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_op(kernels, activation, dtype):
    """A moderate shape with a fused-halves layout, per-token languages with runs, padding and
    out-of-range ids, and a selection of 11 of 48 columns."""
    gate, up = gate_up(37, 48, dtype, "halves", seed=1, device=kernels.device)
    lang = lang_ids(37, 3, seed=1, device=kernels.device)
    run_all_ops(kernels, gate, up, activation, lang, 3, sorted_sel(48, 11, device=kernels.device), seed=1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_and_odd_sizes(kernels, layout):
    """Row strides larger than I, I not a multiple of any vector width, every selection size."""
    for T, I in ((29, 13), (9, 70)):
        gate, up = gate_up(T, I, torch.float32, layout, seed=T, device=kernels.device)
        for k in (0, 1, I):
            run_all_ops(kernels, gate, up, "gelu_tanh", lang_ids(T, 2, seed=k, device=kernels.device), 2,
                        sorted_sel(I, k, seed=k, device=kernels.device), seed=k)


def test_property(kernels):
    """Any shape, dtype, activation, layout, language layout and selection."""

    @settings(max_examples=_examples(kernels, 30), deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        data=st.data(),
        T=st.integers(0, 40),
        I=st.integers(1, 80),
        dtype=st.sampled_from(DTYPES),
        activation=st.sampled_from(ACTIVATIONS),
        layout=st.sampled_from(LAYOUTS),
        num_langs=st.integers(1, 4),
        lang_mode=st.sampled_from(("none", "runs", "random", "alternating")),
        seed=st.integers(0, 2**20),
    )
    def prop(data, T, I, dtype, activation, layout, num_langs, lang_mode, seed):
        dev = kernels.device
        gate, up = gate_up(T, I, dtype, layout, seed=seed, device=dev)
        chosen = data.draw(st.sets(st.integers(0, I - 1), max_size=min(I, 24)))
        sel = torch.tensor(sorted(chosen), dtype=torch.int64, device=dev)
        run_all_ops(kernels, gate, up, activation, lang_ids(T, num_langs, seed, lang_mode, device=dev), num_langs,
                    sel, seed)

    prop()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy overflows to inf
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values(kernels, dtype):
    """Signed zeros, subnormals, huge values, +-inf and NaN in gate; counts exact, NaN sums kept."""
    fi = torch.finfo(dtype)
    specials = [0.0, -0.0, fi.tiny, -fi.tiny, fi.tiny / 4, 1e-30, -1e-30, 1e-3, -1e-3, 5.0, -5.0, 9.0, -9.0,
                30.0, -30.0, 90.0, -90.0, 110.0, -110.0, fi.max, -fi.max, float("inf"), float("-inf"), float("nan")]
    if dtype == torch.bfloat16 and not kernels.exact:
        # act of these is a bf16 subnormal: ATen on an AVX512-BF16 CPU converts with
        # VCVTNEPS2BF16, which flushes it to 0 (the CPU kernels do the same); GPUs round it.
        specials = [v for v in specials if abs(v) > fi.tiny]
    g = torch.tensor(specials, dtype=torch.float32).to(dtype)
    gate = g.repeat(6, 1).to(kernels.device)
    up = torch.tensor([1.0, -2.0, 0.5, 1.0, 0.25, -1.0], dtype=torch.float32)[:, None].expand_as(gate)
    up = up.to(dtype).contiguous().to(kernels.device)
    lang = torch.tensor([0, 0, 1, -1, 1, 0], device=kernels.device)
    for act in ACTIVATIONS:
        g = gate
        if act == "gelu" and not kernels.exact:
            # ATen's CPU gelu (oneDNN for contiguous fp32/bf16) gives NaN at +-inf, its own
            # kernel (fp16, strided, GPUs) +-inf / 0: the GPU backends are not held to oneDNN's.
            g = torch.where(gate.isinf(), torch.zeros_like(gate), gate)
        check_op(kernels, "act_mul_count", kernels.ops.act_mul_count(g, up, act, lang, 2), g, up, act, lang, 2)


@pytest.mark.parametrize("T,I", [(0, 16), (5, 0), (0, 0), (1, 1), (2, 33)])
def test_empty_and_degenerate_shapes(kernels, T, I):
    dev = kernels.device
    gate, up = gate_up(T, I, torch.float32, "contiguous", seed=T + I, device=dev)
    run_all_ops(kernels, gate, up, "silu", None, 2, sorted_sel(I, min(I, 1), device=dev), seed=0)


@pytest.mark.parametrize("mode", ["alternating", "runs"])
def test_many_languages(kernels, mode):
    """num_langs is only a bound (languages without rows count zero); the language changes on
    every row, or in runs across tiles and chunks."""
    T, I, L = 96, 40, 7
    gate, up = gate_up(T, I, torch.float32, "halves", seed=4, device=kernels.device)
    lang = lang_ids(T, L, seed=3, mode=mode, device=kernels.device)
    for act in ACTIVATIONS:
        check_op(kernels, "act_mul_count", kernels.ops.act_mul_count(gate, up, act, lang, L), gate, up, act, lang, L)


def _stable(x64: torch.Tensor, dtype, margin: torch.Tensor) -> torch.Tensor:
    """Where every value within ``margin`` of x (float64) rounds to the same ``dtype`` value:
    there any fp32 evaluation that close to the true value rounds like the reference."""
    lo, hi = (x64 - margin).float().to(dtype), (x64 + margin).float().to(dtype)
    return (lo == hi) & torch.isfinite(x64)


_F64 = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
        "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_rounding_points(kernels, activation, dtype):
    """The module's rounding points on every backend (also those with their own exp/tanh/erf,
    and Triton under the interpreter): wherever act(gate) (and act' for the backward) is not
    within ~2^-17 of a rounding boundary of the dtype, the outputs equal the reference's bit
    for bit: a = round(act(gate)), out = round(a * up), grad_gate = round(act'(gate) *
    round(dh * up)), grad_up = round(dh * a). A kernel that rounds once (act and product in
    fp32) fails this on many elements; the test checks that such elements exist."""
    dev = kernels.device
    gate, up = gate_up(64, 96, dtype, "halves", seed=11, device=dev)
    dh = randn(64, 96, dtype=dtype, seed=12, device=dev)
    g64, u64, dh64 = gate.double().cpu(), up.double().cpu(), dh.double().cpu()
    a64 = _F64[activation](g64)
    # fp32 act is within a few ulps relative, or ~COND (1 + |g|) where 1 + tanh/erf cancels
    stable = _stable(a64, dtype, a64.abs() * 2.0**-18 + 2.0**-19 * (1 + g64.abs()))
    ref_out = (a64.float().to(dtype).double() * u64)  # exact product of the rounded a and up
    once = (a64 * u64).float().to(dtype)  # what a single rounding would give
    want = ref_out.float().to(dtype)
    assert int((stable & (once != want)).sum()) > 50, "no element tells one rounding from two"

    out = kernels.ops.act_mul(gate, up, activation).cpu()
    assert torch.equal(out[stable], want[stable])
    got_count = kernels.ops.act_mul_count(gate, up, activation, None, 1)[0].cpu()
    assert torch.equal(got_count[stable], want[stable])
    sel = sorted_sel(96, 30, device=dev)
    split = kernels.ops.act_mul_split(gate, up, activation, sel)[1].cpu()
    assert torch.equal(split[stable[:, sel.cpu()]], want[:, sel.cpu()][stable[:, sel.cpu()]])

    ga64 = (dh64 * u64).float().to(dtype).double()
    g64r = g64.clone().requires_grad_(True)
    (d64,) = torch.autograd.grad(_F64[activation](g64r), g64r, ga64)
    scale = ga64.abs() * (1 + g64.abs() * (1 + 0.135 * g64 * g64))  # act' is ill-conditioned too
    stable_g = _stable(d64, dtype, d64.abs() * 2.0**-18 + 2.0**-19 * scale)
    grad_gate, grad_up = (t.cpu() for t in kernels.ops.act_mul_backward(dh, gate, up, activation))
    assert torch.equal(grad_gate[stable_g], d64.float().to(dtype)[stable_g])
    want_up = (dh64 * a64.float().to(dtype).double()).float().to(dtype)
    assert torch.equal(grad_up[stable], want_up[stable])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_ops_with_cached_slots(kernels, dtype):
    """ops.sel_slots(sel, I), built once per neuron set, gives the split ops the very same results
    (and spares the GPU backends their per-call check of sel)."""
    from lape_kernels.kernels import ops

    dev = kernels.device
    gate, up = gate_up(23, 40, dtype, "halves", seed=3, device=dev)
    sel = sorted_sel(40, 9, seed=4, device=dev)
    slots = ops.sel_slots(sel, 40)
    assert slots.dtype == torch.int32 and slots.device == sel.device
    assert torch.equal(slots[sel].long().cpu(), torch.arange(9)) and int((slots >= 0).sum()) == 9
    a, b = kernels.ops.act_mul_split(gate, up, "silu", sel), kernels.ops.act_mul_split(gate, up, "silu", sel, slots)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    grad_out, gos = randn(23, 40, dtype=dtype, seed=5, device=dev), randn(23, 9, dtype=dtype, seed=6, device=dev)
    a = kernels.ops.act_mul_backward_split(grad_out, gos, gate, up, "gelu_tanh", sel)
    b = kernels.ops.act_mul_backward_split(grad_out, gos, gate, up, "gelu_tanh", sel, slots)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_wrong_slot_map_cannot_write_out_of_bounds(kernels):
    """Whatever an (unchecked) slot map holds, the kernels write only their own outputs."""
    dev = kernels.device
    gate, up = gate_up(8, 40, torch.float32, "halves", seed=3, device=dev)
    sel = sorted_sel(40, 5, device=dev)
    junk = torch.randint(-(2**31), 2**31 - 1, (40,), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    junk[::3] = torch.arange(-3, 11)[: junk[::3].numel()].int()  # also small and near-k values
    out, out_sel = kernels.ops.act_mul_split(gate, up, "silu", sel, junk.to(dev))
    assert out.shape == (8, 40) and out_sel.shape == (8, 5)
    got = kernels.ops.act_mul_backward_split(gate, randn(8, 5, device=dev), gate, up, "silu", sel, junk.to(dev))
    assert [tuple(t.shape) for t in got] == [(8, 40), (8, 40), (8, 5), (8, 5), (8, 5)]


def test_sel_slots_checks_sel_once():
    from lape_kernels.kernels import ops

    with pytest.raises(ValueError) as info:
        ops.sel_slots(torch.tensor([3, 1]), 6)
    assert str(info.value) == "sel must be sorted ascending and unique, with values in [0, 6)"
    with pytest.raises(ValueError, match="sel must be a 1-D int64 tensor"):
        ops.sel_slots(torch.tensor([1, 3], dtype=torch.int32), 6)
    assert torch.equal(ops.sel_slots(torch.tensor([], dtype=torch.int64), 3), torch.full((3,), -1, dtype=torch.int32))


# --------------------------------------------------------------------- the error model --


def _cases(dev: str):
    """name -> (op, arguments, the exact message, whether the check reads tensor data)."""
    g = randn(4, 6, device=dev)
    u = randn(4, 6, seed=1, device=dev)
    sel = torch.tensor([1, 3], device=dev)
    gos = randn(4, 2, device=dev)
    langs = torch.zeros(4, dtype=torch.int64, device=dev)
    x = randn(4, 6, device=dev)
    w = randn(5, 6, seed=2, device=dev)
    acts = "('silu', 'gelu_tanh', 'gelu')"
    fp = "must be float32, bfloat16 or float16, got"
    bad_sel = "sel must be sorted ascending and unique, with values in [0, 6)"
    contiguous = "must have a contiguous last dimension (stride(1) == 1), got strides [1, 4]"
    return {
        "int gate": ("act_mul", (g.long(), u.long(), "silu"), f"gate {fp} torch.int64", False),
        "float64 gate": ("act_mul", (g.double(), u.double(), "silu"), f"gate {fp} torch.float64", False),
        "float64 up": ("act_mul", (g, u.double(), "silu"), f"up {fp} torch.float64", False),
        "dtype mismatch": ("act_mul", (g, u.half(), "silu"),
                           "gate and up must have the same dtype, got torch.float32 and torch.float16", False),
        "1-D gate": ("act_mul", (g[0], u[0], "silu"), "gate must be 2-D [tokens, intermediate], got shape [6]", False),
        "3-D gate": ("act_mul", (g[None], u[None], "silu"),
                     "gate must be 2-D [tokens, intermediate], got shape [1, 4, 6]", False),
        "1-D up": ("act_mul", (g, u[0], "silu"), "up must be 2-D [tokens, intermediate], got shape [6]", False),
        "shape mismatch": ("act_mul", (g, u[:, :5], "silu"),
                           "gate and up must have the same shape, got [4, 6] and [4, 5]", False),
        "strided gate": ("act_mul", (g.t().contiguous().t(), u, "silu"), f"gate {contiguous}", False),
        "strided up": ("act_mul_count", (g, u.t().contiguous().t(), "silu", None, 1), f"up {contiguous}", False),
        "activation": ("act_mul", (g, u, "relu"), f"activation must be one of {acts}, got 'relu'", False),
        "count activation": ("act_mul_count", (g, u, "gelu_new", None, 1),
                             f"activation must be one of {acts}, got 'gelu_new'", False),
        "backward activation": ("act_mul_backward", (g, g, u, "tanh"),
                                f"activation must be one of {acts}, got 'tanh'", False),
        "num_langs 0": ("act_mul_count", (g, u, "silu", None, 0), "num_langs must be >= 1, got 0", False),
        "num_langs -1": ("act_mul_count", (g, u, "silu", langs, -1), "num_langs must be >= 1, got -1", False),
        "token_lang length": ("act_mul_count", (g, u, "silu", langs[:3], 2),
                              "token_lang must be int64 of shape [4], got torch.int64 of shape [3]", False),
        "token_lang dtype": ("act_mul_count", (g, u, "silu", langs.int(), 2),
                             "token_lang must be int64 of shape [4], got torch.int32 of shape [4]", False),
        "token_lang 2-D": ("act_mul_count", (g, u, "silu", langs[None], 2),
                           "token_lang must be int64 of shape [4], got torch.int64 of shape [1, 4]", False),
        "grad_out shape": ("act_mul_backward", (g[:3], g, u, "silu"),
                           "grad_out and gate must have the same shape, got [3, 6] and [4, 6]", False),
        "grad_out dtype": ("act_mul_backward", (g.half(), g, u, "silu"),
                           "grad_out and gate must have the same dtype, got torch.float16 and torch.float32", False),
        "sel dtype": ("act_mul_split", (g, u, "silu", sel.int()),
                      "sel must be a 1-D int64 tensor, got torch.int32 of shape [2]", False),
        "sel 2-D": ("act_mul_split", (g, u, "silu", sel[None]),
                    "sel must be a 1-D int64 tensor, got torch.int64 of shape [1, 2]", False),
        "sel too large": ("act_mul_split", (g, u, "silu", torch.tensor([1, 6], device=dev)), bad_sel, True),
        "sel negative": ("act_mul_split", (g, u, "silu", torch.tensor([-1, 2], device=dev)), bad_sel, True),
        "sel unsorted": ("act_mul_split", (g, u, "silu", torch.tensor([3, 1], device=dev)), bad_sel, True),
        "sel duplicate": ("act_mul_split", (g, u, "silu", torch.tensor([2, 2], device=dev)), bad_sel, True),
        "backward sel": ("act_mul_backward_split", (g, gos, g, u, "silu", torch.tensor([0, 9], device=dev)),
                         bad_sel, True),
        "slots dtype": ("act_mul_split", (g, u, "silu", sel, torch.zeros(6, dtype=torch.int64, device=dev)),
                        "slots must be int32 of shape [6], got torch.int64 of shape [6]", False),
        "slots shape": ("act_mul_backward_split",
                        (g, gos, g, u, "silu", sel, torch.zeros(5, dtype=torch.int32, device=dev)),
                        "slots must be int32 of shape [6], got torch.int32 of shape [5]", False),
        "grad_out_sel shape": ("act_mul_backward_split", (g, gos[:, :1], g, u, "silu", sel),
                               "grad_out_sel must have shape [4, 2], got [4, 1]", False),
        "grad_out_sel dtype": ("act_mul_backward_split", (g, gos.double(), g, u, "silu", sel),
                               "grad_out_sel must have the dtype of gate (torch.float32), got torch.float64", False),
        "split grad_out": ("act_mul_backward_split", (g.bfloat16(), gos, g, u, "silu", sel),
                           "grad_out and gate must have the same dtype, got torch.bfloat16 and torch.float32", False),
        "x float64": ("gate_up_act_mul_count", (x.double(), w.double(), w.double(), "silu", None, 1),
                      f"x {fp} torch.float64", False),
        "w_gate dtype": ("gate_up_act_mul_count", (x, w.half(), w, "silu", None, 1),
                         "x, w_gate and w_up must have the same dtype, got torch.float32, torch.float16 and "
                         "torch.float32", False),
        "x 1-D": ("gate_up_act_mul_count", (x[0], w, w, "silu", None, 1),
                  "x must be 2-D [tokens, hidden], got shape [6]", False),
        "w_gate 3-D": ("gate_up_act_mul_count", (x, w[None], w, "silu", None, 1),
                       "w_gate must be 2-D [intermediate, hidden], got shape [1, 5, 6]", False),
        "hidden mismatch": ("gate_up_act_mul_count", (x, w[:, :5], w[:, :5], "silu", None, 1),
                            "x and w_gate must have the same hidden size (dim 1), got [4, 6] and [5, 5]", False),
        "w shapes differ": ("gate_up_act_mul_count", (x, w, w[:4], "silu", None, 1),
                            "w_gate and w_up must have the same shape, got [5, 6] and [4, 6]", False),
        "x strided": ("gate_up_act_mul_count", (x.t().contiguous().t(), w, w, "silu", None, 1), f"x {contiguous}",
                      False),
        "w_up strided": ("gate_up_act_mul_count", (x, w, w.t().contiguous().t(), "silu", None, 1),
                         "w_up must have a contiguous last dimension (stride(1) == 1), got strides [1, 5]", False),
        "gemm activation": ("gate_up_act_mul_count", (x, w, w, "relu", None, 1),
                            f"activation must be one of {acts}, got 'relu'", False),
        "gemm num_langs": ("gate_up_act_mul_count", (x, w, w, "silu", None, 0), "num_langs must be >= 1, got 0", False),
        "gemm token_lang": ("gate_up_act_mul_count", (x, w, w, "silu", langs[:3], 2),
                            "token_lang must be int64 of shape [4], got torch.int64 of shape [3]", False),
    }


_CASE_NAMES = sorted(_cases("cpu"))


def _raises(fn, args, message):
    with pytest.raises(ValueError) as info:
        fn(*args)
    assert str(info.value) == message


@pytest.mark.parametrize("name", _CASE_NAMES)
def test_bad_arguments(backend, name):
    op, args, message, _ = _cases(backend.device)[name]
    _raises(getattr(backend.ops, op), args, message)


@pytest.mark.parametrize("name", [n for n in _CASE_NAMES if not _cases("cpu")[n][3]])
def test_bad_arguments_while_tracing(name):
    """The fake kernels (torch.compile, FakeTensorMode) reject what needs no tensor data alike."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    op, args, message, _ = _cases("cpu")[name]
    with FakeTensorMode(allow_non_fake_inputs=True):
        _raises(getattr(torch.ops.lape_kernels, op), args, message)


def test_mixed_devices(backend):
    """A second tensor on another device: the same message everywhere."""
    dev = backend.device
    other = "cpu" if dev == "cuda" else "meta"
    if other == "meta" and backend.name == "cuda_emulated":
        pytest.skip("the emulated backend has no Meta kernels (the fakes are lape_kernels')")
    g = randn(4, 6, device=dev)
    d = torch.device(dev if dev == "cpu" else "cuda:0")
    _raises(backend.ops.act_mul, (g, g.to(other), "silu"),
            f"gate and up must be on the same device, got {d} and {torch.device(other)}")
    w = randn(5, 6, device=dev)
    _raises(backend.ops.gate_up_act_mul_count, (g, w, w.to(other), "silu", None, 1),
            f"x, w_gate and w_up must be on the same device, got {d}, {d} and {torch.device(other)}")
    if other == "cpu":
        _raises(backend.ops.act_mul_count, (g, g, "silu", torch.zeros(4, dtype=torch.int64), 1),
                f"token_lang must be on {d}, got cpu")
        _raises(backend.ops.gate_up_act_mul_count, (g, w, w, "silu", torch.zeros(4, dtype=torch.int64), 1),
                f"token_lang must be on {d}, got cpu")

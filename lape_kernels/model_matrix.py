"""The coverage matrix: every causal-LM type of the installed transformers, built tiny from its own
config class, run through the checks that make a type "supported". Shared by the test suite
(``tests/model/test_coverage.py``) and the generator of ``introspection/coverage.json`` and the
README table (``scripts/coverage_matrix.py``), so the table is what the tests prove.

Checks on a tiny fp32 model (eager attention, no dropout):
  logits    patched logits bit-identical to the unpatched model's (left padding), and ``unpatch``
            gives back exactly the original forward
  counts    ``record()`` over_zero equal to a forward hook on each MLP's activation module over
            the non-padded tokens (left and right padding); act_sum to float tolerance. Routed
            experts: per-expert over_zero and routed equal to an independent recomputation of each
            expert's act(gate) over the tokens the router sent to it (``testing.expert_hook_counts``)
  training  3 AdamW steps of sparse training equal 3 steps of the paper's clone-and-scatter
            slice training of the same neurons on the unpatched model (routed experts: of expert
            neurons, through the stacked weights, ``patch(expert_neurons=...)``)
  merge     ``merge`` returns a plain (unpatched) model whose logits are the trained ones
Test tooling (room 7): imports the library, never imported by it.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["causal_lm_types", "tiny_config", "tiny_model_of_type", "CHECKS", "run_check", "classify",
           "hf_exact_act_mul", "TINY_OVERRIDES"]

VOCAB, HIDDEN, INTER = 256, 64, 128

#: shrunk sizes for any config attribute of these names (only ever made smaller)
_SIZES = {
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "num_decoder_layers": 2,
    "hidden_size": HIDDEN, "n_embd": HIDDEN, "d_model": HIDDEN,
    "intermediate_size": INTER, "ffn_hidden_size": INTER, "n_inner": INTER, "d_ff": INTER, "ffn_dim": INTER,
    "moe_intermediate_size": 32, "expert_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "num_key_value_heads": 2, "num_kv_heads": 2,
    "head_dim": 16, "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 16, "qk_head_dim": 16,
    "vocab_size": VOCAB, "max_position_embeddings": 256, "n_positions": 256,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "moe_topk": 2, "sliding_window": 16,
    # state-space mixers of hybrid models: heads * head size = expand * hidden
    "mamba_n_heads": 4, "mamba_d_head": 32, "mamba_d_state": 16, "mamba_n_groups": 1, "mamba_chunk_size": 16,
}
#: attributes set even when the default is None (attention code divides by them)
_FILL_NONE = {"head_dim": 16, "num_key_value_heads": 2}
_LAYER_LISTS = ("layer_types", "layers_block_type", "mlp_layer_types", "block_types")
_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

#: per-type config settings the generic shrink cannot guess (checked by the matrix like the rest)
TINY_OVERRIDES: Dict[str, Dict[str, Any]] = {
    # non-neutral scalings, so that the checks see what real checkpoints do
    "granite": dict(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25),
    "cohere": dict(logit_scale=0.25),
}
#: a "tiny" model larger than this still carries full-size towers for other modalities
MAX_TINY_PARAMETERS = 20_000_000


def causal_lm_types() -> List[str]:
    """Every model_type transformers maps to a causal-LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _layers_to_keep(config: Any, n: int) -> int:
    """At least ``n`` layers, and enough that every kind of layer of the full model is in the tiny
    one (the first MoE layer after ``first_k_dense_replace`` dense ones, the first full-attention
    layer among sliding ones): a tiny model without them would prove a different architecture."""
    kinds = [n]
    first_dense = getattr(config, "first_k_dense_replace", None)
    if isinstance(first_dense, int) and first_dense > 0:
        kinds.append(first_dense + 1)
    for key in _LAYER_LISTS:
        cur = getattr(config, key, None)
        if isinstance(cur, (list, tuple)) and cur:
            seen = []
            for i, kind in enumerate(cur):
                if kind not in seen:
                    seen.append(kind)
                    kinds.append(i + 1)
    return min(max(kinds), 8)


def _shrink(config: Any) -> None:
    for key, small in _SIZES.items():
        cur = getattr(config, key, None)
        if isinstance(cur, int) and not isinstance(cur, bool) and cur > small:
            with contextlib.suppress(Exception):
                setattr(config, key, small)
    for key, value in _FILL_NONE.items():
        if hasattr(config, key) and getattr(config, key) is None:
            with contextlib.suppress(Exception):
                setattr(config, key, value)
    n = getattr(config, "num_hidden_layers", None)
    if isinstance(n, int):
        n = _layers_to_keep(config, n)
        with contextlib.suppress(Exception):
            config.num_hidden_layers = n
        for key in _LAYER_LISTS:
            cur = getattr(config, key, None)
            if isinstance(cur, (list, tuple)) and len(cur) > n:
                with contextlib.suppress(Exception):
                    setattr(config, key, list(cur[:n]))
    for key, value in _TOKEN_IDS.items():
        cur = getattr(config, key, None)
        if isinstance(cur, int) and cur >= VOCAB:
            setattr(config, key, value)
        elif isinstance(cur, list):
            setattr(config, key, [c if c < VOCAB else value for c in cur])
    if isinstance(getattr(config, "mamba_d_ssm", None), int) and isinstance(getattr(config, "mamba_n_heads", None), int):
        with contextlib.suppress(Exception):
            config.mamba_d_ssm = config.mamba_n_heads * config.mamba_d_head
    if isinstance(getattr(config, "qk_rope_head_dim", None), int) and hasattr(config, "head_dim"):
        with contextlib.suppress(Exception):  # multi-head latent attention: rotary size is head_dim,
            config.head_dim = config.qk_rope_head_dim  # and keys have every query head
            config.num_key_value_heads = config.num_attention_heads
    for key, cur in list(vars(config).items()):  # deterministic training: no dropout or router jitter anywhere
        if isinstance(cur, float) and ("dropout" in key or "pdrop" in key or "jitter" in key):
            setattr(config, key, 0.0)


def _config_parts(config: Any) -> List[Any]:
    """The config and every config nested in it (text, vision, audio ...), each once."""
    from transformers import PretrainedConfig

    parts, todo = {}, [config]
    while todo:
        c = todo.pop()
        if id(c) in parts:
            continue
        parts[id(c)] = c
        todo += [v for v in vars(c).values() if isinstance(v, PretrainedConfig)]
    if hasattr(config, "get_text_config"):
        text = config.get_text_config()
        parts.setdefault(id(text), text)
    return list(parts.values())


def tiny_config(model_type: str) -> Any:
    """The config class's defaults for ``model_type``, shrunk (text part of a multimodal config)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **TINY_OVERRIDES.get(model_type, {}))
    for part in _config_parts(config):
        _shrink(part)
    config._attn_implementation = "eager"
    return config


@torch.no_grad()
def _init_weights(model: nn.Module, seed: int) -> None:
    """O(1) activations with both signs in every neuron's gate (HF's 0.02-std init makes
    everything near zero and many neurons' gradients float noise)."""
    g = torch.Generator().manual_seed(seed)
    tied = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.weight.copy_(torch.randn(module.weight.shape, generator=g))
        elif isinstance(module, nn.Linear) and id(module.weight) not in tied:
            module.weight.copy_(torch.randn(module.weight.shape, generator=g) / module.weight.shape[1] ** 0.5)
            if module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
        for name in ("gate_up_proj", "down_proj"):  # stacked expert weights [E, out, in] (not nn.Linear)
            w = module._parameters.get(name)
            if w is not None and w.dim() == 3:
                w.copy_(torch.randn(w.shape, generator=g) / w.shape[2] ** 0.5)


def tiny_model_of_type(model_type: str, seed: int = 0) -> nn.Module:
    """A tiny random fp32 causal LM of ``model_type`` (eval mode)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    _init_weights(model, seed)
    return model.float().eval()


# ------------------------------------------------------------------------- inputs


def _batch(padding: Optional[str], seed: int = 0, batch: int = 3, seq: int = 10) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    for b in range(1, batch if padding else 0):
        n_pad = 2 * b + 1
        if padding == "left":
            mask[b, :n_pad] = 0
        else:
            mask[b, seq - n_pad:] = 0
    return ids.masked_fill(mask == 0, _TOKEN_IDS["pad_token_id"]), mask


def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


# ------------------------------------------------------------------------- the HF-exact reference op


def _hf_act_mul(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up with ATen's formulas and the module's rounding points (the rounding the
    kernels branch adopts, issue #10)."""
    import torch.nn.functional as F

    act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}[activation]
    return act(gate) * up


@contextlib.contextmanager
def hf_exact_act_mul():
    """Run the patched forward with ``_hf_act_mul`` instead of the kernel: tells a difference
    that is only the kernels' activation rounding from one that is not."""
    from .kernels import ops

    saved = ops.act_mul
    ops.act_mul = _hf_act_mul
    try:
        yield
    finally:
        ops.act_mul = saved


# ------------------------------------------------------------------------- checks


def _mlps(model: nn.Module):
    from .introspection import discover

    return discover(model).mlps


def check_logits(model: nn.Module) -> None:
    """Patched logits bit-identical to unpatched; unpatch restores the original forwards."""
    import lape_kernels as lk

    ids, mask = _batch("left", seed=1)
    want = _logits(model, ids, mask)
    patched = lk.patch(copy.deepcopy(model))
    got = _logits(patched, ids, mask)
    if not torch.equal(got, want):
        diff = float((got - want).abs().max())
        raise AssertionError(f"patched logits differ from the unpatched model's (max |diff| {diff:.3g})")
    lk.unpatch(patched)
    for mlp in list(_mlps(patched)) + list(_found(patched).experts):
        assert "forward" not in mlp.module.__dict__ and not hasattr(mlp.module, "_lape"), "unpatch left state"
    assert torch.equal(_logits(patched, ids, mask), want), "unpatched logits differ from the original"


def _hook_counts(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(over_zero [L, I], act_sum [L, I]) from forward hooks on each MLP's activation module of an
    unpatched copy (the LAPE reference's way), over the tokens where ``mask`` is 1. An MLP whose
    forward calls an ATen activation directly is observed through its gate projection."""
    ref = copy.deepcopy(model)
    mlps = _mlps(ref)
    valid = mask.reshape(-1).bool()
    over_zero: Dict[int, torch.Tensor] = {}
    act_sum: Dict[int, torch.Tensor] = {}
    current: List[int] = []

    def record(index: int, act: torch.Tensor) -> None:
        a = act.float().reshape(valid.shape[0], -1)[valid]
        over_zero[index] = (a > 0).sum(0)
        act_sum[index] = a.double().sum(0)

    handles = []
    hooked = set()
    for m in mlps:
        handles.append(m.module.register_forward_pre_hook(lambda mod, args, i=m.layer_index: current.append(i)))
        if m.activation_module is not None:
            if id(m.activation_module) not in hooked:  # shared activation modules: one hook, per-layer routing
                hooked.add(id(m.activation_module))
                handles.append(m.activation_module.register_forward_hook(lambda mod, a, out: record(current[-1], out)))
        else:
            def gate_hook(mod, args, m=m):
                gate, _ = m.family.gate_up(mod, args[0].reshape(-1, args[0].shape[-1]))
                record(m.layer_index, _hf_act_mul(gate, torch.ones_like(gate), m.activation))
            handles.append(m.module.register_forward_pre_hook(gate_hook))
    try:
        _logits(ref, ids, mask)
    finally:
        for h in handles:
            h.remove()
    L = len(mlps)
    return torch.stack([over_zero[i] for i in range(L)]), torch.stack([act_sum[i] for i in range(L)])


def check_counts(model: nn.Module) -> None:
    """record() equals the activation hook over non-padded tokens, left and right padding (and,
    for routed experts, the per-expert reference recomputation)."""
    import lape_kernels as lk

    found = _found(model)
    for padding, seed in (("left", 2), ("right", 3)):
        ids, mask = _batch(padding, seed=seed)
        patched = copy.deepcopy(model)
        with lk.record(patched) as stats:
            _logits(patched, ids, mask)
        if stats.n_tokens != int(mask.sum()):
            raise AssertionError(f"{padding} padding: record counted {stats.n_tokens} tokens, mask has {int(mask.sum())}")
        if found.experts:
            _check_expert_counts(model, stats, ids, mask, padding)
        if not found.mlps:
            continue
        want_oz, want_sum = _hook_counts(model, ids, mask)
        if not torch.equal(stats.over_zero, want_oz):
            n = int((stats.over_zero != want_oz).sum())
            raise AssertionError(f"{padding} padding: over_zero differs from the activation hook in {n} entries")
        torch.testing.assert_close(stats.act_sum, want_sum, rtol=1e-5, atol=1e-4)


def _found(model: nn.Module):
    from .introspection import discover

    return discover(model, probe=False)


def _check_expert_counts(model: nn.Module, stats: Any, ids: torch.Tensor, mask: torch.Tensor, padding: str) -> None:
    from .testing import expert_hook_counts

    want = expert_hook_counts(model, ids, mask)
    ex = stats.experts
    if not torch.equal(ex.routed, want["routed"][0]):
        raise AssertionError(f"{padding} padding: experts.routed differs from the router's choice")
    if not torch.equal(ex.over_zero, want["over_zero"][0]):
        n = int((ex.over_zero != want["over_zero"][0]).sum())
        raise AssertionError(f"{padding} padding: experts.over_zero differs from the per-expert reference in {n} entries")
    torch.testing.assert_close(ex.act_sum, want["act_sum"][0], rtol=1e-5, atol=1e-4)


def _slice_oracle(model: nn.Module, neurons: List[torch.Tensor]) -> Tuple[nn.Module, List[nn.Parameter]]:
    """An unpatched copy training only the selected neurons through dense weights (the paper's
    clone and scatter: ``lape_kernels.testing.slice_training``) and its slices."""
    from .testing import slice_training

    oracle = copy.deepcopy(model)
    return oracle, slice_training(oracle, neurons)


def _train_batch() -> Tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of the training checks (and of their live-neuron probes)."""
    ids, _ = _batch(None, seed=4, batch=2, seq=8)
    labels = ids.clone()
    labels[0, :2] = -100
    return ids, labels


def _train(model: nn.Module, params: List[nn.Parameter], steps: int = 3) -> List[float]:
    ids, labels = _train_batch()
    from .testing import adamw_steps

    return adamw_steps(model, params, ids, labels, steps=steps)


def _live_neurons(model: nn.Module, k: int = 5) -> List[torch.Tensor]:
    """k neurons per layer whose gate, up and down weights all get a clear gradient (a dead
    neuron's AdamW update is float noise on which two exact methods may disagree)."""
    probe = copy.deepcopy(model)
    ids, labels = _train_batch()  # the training batch itself: a neuron live there is live in step 1
    probe(input_ids=ids, labels=labels, use_cache=False).loss.backward()
    g = torch.Generator().manual_seed(5)
    out = []
    for m in _mlps(probe):
        fam, mod = m.family, m.module
        if fam.fused_gate_up:
            gg, gu = fam._split_rows(getattr(mod, fam.gate_up_name).weight.grad)
        else:
            gg, gu = getattr(mod, fam.gate_name).weight.grad, getattr(mod, fam.up_name).weight.grad
        gd = getattr(mod, fam.down_name).weight.grad.t()
        score = torch.stack([t.abs().min(1).values / t.abs().max() for t in (gg, gu, gd)]).min(0).values
        live = torch.nonzero(score > 1e-4).flatten()
        if live.numel() < k:
            raise AssertionError(f"layer {m.layer_index}: only {live.numel()} neurons with a clear gradient")
        out.append(live[torch.randperm(live.numel(), generator=g)[:k]].sort().values)
    return out


def check_training(model: nn.Module) -> None:
    """Sparse training == slice training (3 AdamW steps); merge gives a plain model with the trained
    logits. Dense MLPs (a MoE model's shared experts included) and routed experts, each."""
    found = _found(model)
    if found.mlps:
        _check_dense_training(model)
    if found.experts:
        _check_expert_training(model)


def _train_and_merge(model: nn.Module, ours: nn.Module, oracle: nn.Module, oracle_params: List[nn.Parameter],
                     what: str) -> Tuple[List[torch.Tensor], nn.Module]:
    """3 AdamW steps of ``ours`` (patched) and of the slice-training ``oracle``: the same losses,
    falling; then ``merge(ours)``, which must be a plain model with ``model``'s state_dict keys.
    Returns (the trained small parameters, the merged model)."""
    import lape_kernels as lk

    ours.train(), oracle.train()
    want, got = _train(oracle, oracle_params), _train(ours, lk.trainable_parameters(ours))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)
    if not got[-1] < got[0]:
        raise AssertionError(f"{what} did not lower the loss: {got}")
    oracle.eval()
    trained = [p.detach().clone() for p in lk.trainable_parameters(ours)]
    merged = lk.merge(ours).eval()
    if lk.is_patched(merged) or any(n.startswith("lape_") or ".lape_" in n for n, _ in merged.named_parameters()):
        raise AssertionError("merge did not return a plain model")
    assert list(merged.state_dict()) == list(model.state_dict()), "merge changed the state_dict's keys"
    return trained, merged


def _check_merged_function(merged: nn.Module, oracle: nn.Module, what: str) -> None:
    """The trained function: the merged plain model against the oracle's (fp32 summation order
    differs between small slice matmuls and dense ones: relative, not bitwise)."""
    ids, mask = _batch("right", seed=6)
    got, want = _logits(merged, ids, mask), _logits(oracle, ids, mask)
    diff, scale = float((got - want).abs().max()), float(want.abs().max())
    if diff > 1e-5 * scale:
        raise AssertionError(f"merged logits differ from {what}'s by {diff:.3g} (scale {scale:.3g})")


def _check_expert_training(model: nn.Module) -> None:
    """patch(expert_neurons=...) == slice training through the stacked weights (3 AdamW steps);
    merge writes exactly the trained slices and gives slice training's function."""
    import lape_kernels as lk
    from .testing import live_expert_neurons, slice_training

    base = copy.deepcopy(model)
    ids, labels = _train_batch()
    sel = live_expert_neurons(base, ids, k=3, seed=5, labels=labels)
    if not any(t.numel() for row in sel for t in row):
        raise AssertionError("no expert neuron gets a clear gradient on the training batch")
    oracle = copy.deepcopy(base)
    oracle_params = slice_training(oracle, None, sel)
    ours = lk.patch(copy.deepcopy(base), expert_neurons=sel)
    trained, merged = _train_and_merge(model, ours, oracle, oracle_params, "expert training")
    params = iter(trained)
    for x, x0, per_expert in zip(_found(merged).experts, _found(base).experts, sel):
        if not sum(t.numel() for t in per_expert):
            continue
        pg, pu, pd = next(params), next(params), next(params)
        gu, dn = x.module.gate_up_proj.detach(), x.module.down_proj.detach()
        gu0, dn0 = x0.module.gate_up_proj.detach(), x0.module.down_proj.detach()
        rest_gu, rest_dn, slot, inter = torch.ones(gu.shape[:2], dtype=torch.bool), \
            torch.ones(dn.shape[0], dn.shape[2], dtype=torch.bool), 0, x.intermediate_size
        for e, t in enumerate(per_expert):
            k = t.numel()
            assert torch.equal(gu[e, t], pg[slot:slot + k]) and torch.equal(gu[e, t + inter], pu[slot:slot + k]) and \
                torch.equal(dn[e][:, t], pd[:, slot:slot + k]), "merged expert slices"
            rest_gu[e, t], rest_gu[e, t + inter], rest_dn[e, t], slot = False, False, False, slot + k
        assert torch.equal(gu[rest_gu], gu0[rest_gu]) and \
            torch.equal(dn.transpose(1, 2)[rest_dn], dn0.transpose(1, 2)[rest_dn]), "merge changed other expert weights"
    _check_merged_function(merged, oracle, "expert slice training")


def _check_dense_training(model: nn.Module) -> None:
    import lape_kernels as lk

    base = copy.deepcopy(model)
    neurons = _live_neurons(base)
    oracle, oracle_params = _slice_oracle(base, neurons)
    ours = lk.patch(copy.deepcopy(base), neurons=neurons)
    trained, merged = _train_and_merge(model, ours, oracle, oracle_params, "training")
    # exactly the trained slices written into the selected rows/columns, nothing else changed
    for m, b, sel, (pg, pu, pd) in zip(_mlps(merged), _mlps(base), neurons, zip(*[iter(trained)] * 3)):
        (wg, wu, wd), (bg, bu, bd) = m.family.weights(m.module), b.family.weights(b.module)
        rest = torch.ones(wg.shape[0], dtype=torch.bool)
        rest[sel] = False
        assert torch.equal(wg[sel], pg) and torch.equal(wu[sel], pu) and torch.equal(wd[:, sel], pd), "merged slices"
        assert torch.equal(wg[rest], bg[rest]) and torch.equal(wu[rest], bu[rest]) and torch.equal(wd[:, rest], bd[:, rest])
    _check_merged_function(merged, oracle, "slice training")


CHECKS: Dict[str, Callable[[nn.Module], None]] = {
    "logits": check_logits,
    "counts": check_counts,
    "training": check_training,
}


def run_check(name: str, model: nn.Module, hf_exact: bool = False) -> None:
    """Run check ``name`` on ``model`` (never modified); with ``hf_exact`` through the HF-exact op."""
    with hf_exact_act_mul() if hf_exact else contextlib.nullcontext():
        CHECKS[name](model)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def classify(model_type: str) -> Dict[str, Any]:
    """Build, check and classify one model type: {"status": supported | refused | untestable |
    failing, "reason": ..., "xfail": [checks that pass only with HF-exact rounding]}."""
    import lape_kernels as lk
    from .introspection import HOW_TO_CHECK, UnsupportedModelError

    try:
        model = tiny_model_of_type(model_type)
    except Exception as exc:  # noqa: BLE001 - the reason is the table's content
        return {"status": "untestable", "reason": f"tiny model cannot be built offline ({_one_line(exc)})"}
    size = sum(p.numel() for p in model.parameters())
    if size > MAX_TINY_PARAMETERS:
        return {"status": "untestable", "reason": f"the shrunk config still has {size / 1e6:.0f}M parameters (sizes "
                                                  "the generic shrink does not reach, e.g. towers for other modalities)"}
    try:
        found = lk.check_model(model)
    except UnsupportedModelError as exc:
        return {"status": "refused", "reason": str(exc).replace(f"; {HOW_TO_CHECK}", "")}
    try:
        _logits(model, *_batch("left", seed=0))
    except Exception as exc:  # noqa: BLE001
        return {"status": "untestable", "reason": f"the tiny model's own forward fails ({_one_line(exc)})"}
    xfail, failures = [], []
    for name in CHECKS:
        try:
            run_check(name, model)
        except AssertionError as exc:
            try:
                run_check(name, model, hf_exact=True)
            except Exception as exc2:  # noqa: BLE001
                failures.append(f"{name}: {_one_line(exc2)}")
            else:
                xfail.append(name)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{name}: {_one_line(exc)}")
    if failures:
        return {"status": "failing", "reason": "; ".join(failures)}
    out: Dict[str, Any] = {"status": "supported", "reason": f"{lk.check_model(model)}"}
    if xfail:
        out["xfail"] = xfail
    return out

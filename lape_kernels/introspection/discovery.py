"""Find every decoder layer's gated MLP by structure, and prove by running it that it computes
``down(act(gate(x)) * up(x))`` — the only function our kernels implement.

Structure proposes, the probe decides. Structure: the decoder layers are the ModuleList of blocks
in the language model (``get_decoder()``, so a vision or audio tower is never patched); in each
block, the MLP is the child whose Linear children have a gated shape (two ``H -> I`` projections
and one ``I -> H``, or one fused ``H -> 2I`` and one ``I -> H``), with an activation and nothing
else that computes (a norm, a scale parameter, a dropout that drops, a quantising Linear). The
probe: the module's own forward on a small random input, compared with our decomposition for
each reading of the structure (which projection is the gate, how a fused projection is laid
out); exactly one must reproduce it. A model that is structurally gated but computes something
else (clamps, scaled sigmoids, extra terms) fails the probe and is refused with the reason.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .activations import UnknownActivation, kernel_activation
from .experts import ExpertShape, ExpertsFFN, find_experts, prove_experts
from .family import FUSED_LAYOUTS, MLPFamily, UnsupportedModelError
from .model import model_type, text_config
from .registry import family_override

__all__ = ["GatedMLP", "Discovery", "discover", "decoder_layers", "decoder_body", "mlp_modules", "family_for",
           "HOW_TO_CHECK", "MLPShape", "mlp_shape", "expert_shape"]

HOW_TO_CHECK = ("check a model with lape_kernels.check_model(model); tested model types: "
                "lape_kernels.supported_model_types()")

# names that say which separate projection is the gate: only an ordering hint, the probe decides
_GATE_HINTS = ("gate_proj", "gate", "w1", "wi_0", "fc_gate", "linear_gate")
# ATen activations tried when the forward calls one directly (no activation attribute)
_FUNCTIONAL_ACTIVATIONS: Tuple[Tuple[str, Callable], ...] = (
    ("silu", F.silu), ("gelu", F.gelu), ("gelu_tanh", functools.partial(F.gelu, approximate="tanh")),
)
# max |forward - decomposition| / max |forward| accepted by the probe (rounding of the same math)
_PROBE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _refuse(msg: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{msg}; {HOW_TO_CHECK}")


@dataclass(frozen=True)
class GatedMLP:
    """One decoder layer's MLP, read and proven."""

    layer_index: int
    path: str
    module: nn.Module
    family: MLPFamily
    activation: str
    #: kernel activation name ("" when read without probing and the forward calls a function)
    #: the module that computes act(gate) (what a reference hook observes); None when the forward
    #: calls an ATen function directly
    activation_module: Optional[nn.Module]


@dataclass(frozen=True)
class Discovery:
    """What ``check_model`` found: the decoder body, its layers and each layer's gated MLP."""

    model_type: Optional[str]
    body: nn.Module
    layers: nn.ModuleList
    layers_path: str
    mlps: Tuple[GatedMLP, ...]
    probed: bool
    #: the routed experts of the mixture-of-experts layers (empty for a dense model)
    experts: Tuple[ExpertsFFN, ...] = ()

    def __str__(self) -> str:
        moe = ""
        if self.experts:
            x = self.experts[0]
            moe = (f"{len(self.experts)} mixture-of-experts layers ({x.num_experts} experts of intermediate size "
                   f"{x.intermediate_size}, activation {x.activation}, at {x.path.rpartition('.')[2]})")
            if not self.mlps:
                proof = "each checked against its own forward" if self.probed else "NOT probed (meta tensors)"
                return (f"{self.model_type or type(self.body).__name__}: {len(self.layers)} decoder layers at "
                        f"{self.layers_path}, {moe}, {proof}")
            moe = f"; {moe}"
        first = self.mlps[0]
        fam = first.family
        fused = f"fused {fam.gate_up_name} ({fam.fused_layout})" if fam.fused_gate_up else f"gate {fam.gate_name}, up {fam.up_name}"
        proof = "each checked against its own forward" if self.probed else "NOT probed (meta tensors)"
        return (f"{self.model_type or type(self.body).__name__}: {len(self.mlps)} decoder layers at {self.layers_path}, "
                f"gated MLP {type(first.module).__name__} ({fused}, down {fam.down_name}, activation "
                f"{first.activation}){moe}, {proof}")


# ------------------------------------------------------------------------- decoder layers


def _language_model(model: nn.Module) -> nn.Module:
    """The text decoder of a (possibly multimodal) model: towers for other modalities are not ours."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except Exception:  # noqa: BLE001 - some models raise for "no decoder": search the whole model
            decoder = None
        if isinstance(decoder, nn.Module):
            return decoder
    return model


def _parent(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path.rpartition(".")[0]) if "." in path else root


def decoder_layers(model: nn.Module) -> Tuple[nn.Module, nn.ModuleList]:
    """(decoder body, its ModuleList of decoder layers). The body is where the attention mask
    arrives (statistics hook it). Found by structure inside the language model: the ModuleList
    whose blocks have a feed-forward child (gated first), preferring the configured layer count."""
    body, layers, _ = _find_layers(model)
    return body, layers


def decoder_body(model: nn.Module) -> nn.Module:
    return decoder_layers(model)[0]


def _find_layers(model: nn.Module) -> Tuple[nn.Module, nn.ModuleList, str]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    root = _language_model(model)
    prefix = next((n for n, m in model.named_modules() if m is root), "")
    n_layers = getattr(text_config(model), "num_hidden_layers", None)
    best, gated_lists = None, []
    for path, module in root.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        block = module[0]
        if isinstance(block, (nn.Linear, nn.ModuleList)) or not list(block.children()):
            continue
        gated = any(_shape_match(c) for _, c in block.named_children())
        ffn = gated or any(_is_moe(c) for _, c in block.named_children())
        score = (gated, ffn, len(module) == n_layers)
        if gated and len(module) == n_layers:
            gated_lists.append(path)
        if best is None or score > best[0]:
            best = (score, path, module)
    if best is None:
        raise _refuse(f"{type(model).__name__} (model_type {model_type(model)!r}) has no decoder layers "
                      f"(no ModuleList of blocks under {type(root).__name__})")
    _, path, layers = best
    full = f"{prefix}.{path}" if prefix else path
    gated = best[0][0]  # an ungated model is refused for that, by the MLP search, not for its stacks
    if gated and len(gated_lists) > 1:
        raise _refuse(f"{type(model).__name__} (model_type {model_type(model)!r}) has several stacks of gated decoder "
                      f"layers ({', '.join(gated_lists)}): one LAPE layer axis cannot describe them")
    body = _parent(root, path)
    if gated and not _takes_tokens(body):
        raise _refuse(f"{type(model).__name__} (model_type {model_type(model)!r}): the decoder layers at {full} are "
                      f"run by {type(body).__name__}, which takes no input_ids/inputs_embeds: its tokens (and padding) "
                      "cannot be told apart")
    return body, layers, full


def _takes_tokens(body: nn.Module) -> bool:
    """Whether the module that runs the layers is called with the tokens (where ``record`` reads
    the attention mask and counts tokens)."""
    import inspect

    try:
        params = inspect.signature(body.forward).parameters
    except (TypeError, ValueError):
        return True
    return "input_ids" in params or "inputs_embeds" in params


# ------------------------------------------------------------------------- structure


def _is_moe(module: nn.Module) -> bool:
    """Experts: a submodule named ``experts`` (or ``expert``), or stacked 3-D expert weights."""
    if any(name.rpartition(".")[2] in ("experts", "expert") for name, _ in module.named_modules() if name):
        return True
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # 3-D kernels of their own (state-space mixers)
    return any(p.dim() == 3 for m in module.modules() if not isinstance(m, convs) for p in m.parameters(recurse=False))


def _linears(module: nn.Module) -> List[Tuple[str, nn.Linear]]:
    return [(n, c) for n, c in module.named_children() if isinstance(c, nn.Linear)]


def _shape_match(module: nn.Module) -> List[MLPFamily]:
    """Every reading of ``module``'s Linear children as a gated MLP (empty: not gated-shaped)."""
    lins = _linears(module)
    readings: List[MLPFamily] = []
    if len(lins) == 3:
        for (dn, d), (an, a), (bn, b) in ((lins[i], *[lins[j] for j in range(3) if j != i]) for i in range(3)):
            if a.in_features == b.in_features == d.out_features and a.out_features == b.out_features == d.in_features:
                pairs = [(an, bn), (bn, an)]
                pairs.sort(key=lambda p: p[0] not in _GATE_HINTS)  # a gate-like name first
                readings += [MLPFamily(type(module).__name__, gate_name=g, up_name=u, down_name=dn) for g, u in pairs]
    elif len(lins) == 2:
        for (fn, f), (dn, d) in (lins, lins[::-1]):
            if f.in_features == d.out_features and f.out_features == 2 * d.in_features:
                readings += [MLPFamily(type(module).__name__, gate_name=None, up_name=None, down_name=dn,
                                       gate_up_name=fn, fused_layout=layout) for layout in FUSED_LAYOUTS]
    return readings


def _activation_like(child: nn.Module) -> bool:
    return not isinstance(child, (nn.Linear, nn.Dropout, nn.Identity)) and not list(child.parameters()) \
        and not list(child.children())


def _activations(module: nn.Module) -> List[Tuple[str, Any]]:
    """Children that can only be the activation (parameter-free leaf modules), and plain function
    attributes holding an activation (``self.act = F.silu``)."""
    found = [(n, c) for n, c in module.named_children() if _activation_like(c)]
    for name, value in vars(module).items():
        if not name.startswith("_") and callable(value) and not isinstance(value, nn.Module) \
                and not isinstance(value, type) and _is_function_activation(value):
            found.append((name, value))
    return found


def _is_function_activation(fn: Any) -> bool:
    try:
        kernel_activation(fn)
        return True
    except UnknownActivation:
        return False


def _problems(module: nn.Module, family: MLPFamily) -> List[str]:
    """What in ``module`` would make our decomposition a different function, however it is read."""
    problems = []
    # lape_* are our own trainable slices (sparse training), not the model's
    own = [n for n, p in module.named_parameters(recurse=False) if not n.startswith("lape_")]
    if own:
        problems.append(f"it has its own parameters {own} (scales outside the projections)")
    for name, child in module.named_children():
        if name in family.linear_names:
            if type(child).forward is not nn.Linear.forward:
                problems.append(f"{name} is a {type(child).__name__} with its own forward, not a plain nn.Linear")
        elif isinstance(child, nn.Dropout):
            if child.p > 0:
                problems.append(f"{name} is Dropout(p={child.p}): the patched MLP would not drop")
        elif list(child.parameters()) or list(child.children()):
            problems.append(f"{name} ({type(child).__name__}) computes inside the MLP (e.g. a norm): not "
                            "act(gate) * up then down")
    return problems


@dataclass
class _Candidate:
    name: str
    module: nn.Module
    readings: List[MLPFamily]
    activations: List[Tuple[str, Any]]
    problems: List[str]


def _candidates(block: nn.Module, override: Optional[MLPFamily]) -> List[_Candidate]:
    out = []
    for name, child in block.named_children():
        if override is not None and override.ffn_name is not None and name != override.ffn_name:
            continue
        readings = _shape_match(child)
        if override is not None:
            readings = [override] if readings or override.ffn_name == name else []
            if readings and not all(isinstance(getattr(child, n, None), nn.Linear) for n in override.linear_names):
                readings = []
        if not readings:
            continue
        acts = _activations(child)
        if override is not None and override.act_name is not None:
            act = getattr(child, override.act_name, None)
            acts = [(override.act_name, act)] if act is not None else []
        if not acts and any(k in name.lower() for k in ("attn", "attention")):
            continue  # a fused-QKV attention can have a gated shape; an MLP has an activation
        problems = _problems(child, readings[0])
        if len(acts) > 1:
            problems.append(f"it has several activation-like members {[n for n, _ in acts]}")
        out.append(_Candidate(name, child, readings, acts, problems))
    return out


def _moe_children(block: nn.Module) -> List[str]:
    return [n for n, c in block.named_children() if "attn" not in n and "attention" not in n and _is_moe(c)]


def _pick_moe(block: nn.Module, where: str, override: Optional[MLPFamily]) -> Tuple[Optional[_Candidate], str, nn.Module]:
    """A mixture-of-experts layer: (its dense gated MLP, e.g. Qwen2-MoE's shared expert, or None;
    the experts' path in the block; the experts module). Refused when the experts are not the
    stacked layout we compute."""
    moe = _moe_children(block)
    if len(moe) > 1:
        raise _refuse(f"{where} has several mixture-of-experts children {moe}")
    name = moe[0]
    block_moe = block.get_submodule(name)
    found = find_experts(block_moe)
    if found is None:
        raise _refuse(f"{where}: its feed-forward {name} ({type(block_moe).__name__}) is a mixture of experts whose "
                      "experts are not stacked gate_up_proj [E, 2I, H] / down_proj [E, H, I] weights (not the layout "
                      "lape_kernels computes)")
    inner = [c for c in _candidates(block_moe, override) if c.name != found[0]]
    outer = [c for c in _candidates(block, override) if c.name != name]
    dense = [c for c in inner + outer if not c.problems and c.activations]
    if len(dense) > 1:
        raise _refuse(f"{where}: several dense gated MLPs beside the experts {[c.name for c in dense]}")
    if dense and dense[0] in inner:
        dense[0] = _Candidate(f"{name}.{dense[0].name}", *[getattr(dense[0], f) for f in
                                                           ("module", "readings", "activations", "problems")])
    return (dense[0] if dense else None), f"{name}.{found[0]}", found[1]


def _pick(block: nn.Module, where: str, override: Optional[MLPFamily]) -> _Candidate:
    """The one gated MLP of a decoder layer (or why there is none)."""
    cands = _candidates(block, override)
    moe = _moe_children(block)
    if moe:
        raise _refuse(f"{where}: its feed-forward {moe[0]} ({type(block.get_submodule(moe[0])).__name__}) is a "
                      "mixture of experts")
    clean = [c for c in cands if not c.problems]
    if len(clean) > 1:
        with_act = [c for c in clean if c.activations]
        clean = with_act if with_act else clean
    if len(clean) == 1:
        return clean[0]
    if len(clean) > 1:
        raise _refuse(f"{where} has several gated-MLP-shaped children {[c.name for c in clean]}: name the "
                      "MLP with lape_kernels.introspection.register_family")
    if cands:
        c = cands[0]
        raise _refuse(f"{where}: {c.name} ({type(c.module).__name__}) has a gated shape but is not our math: "
                      + "; ".join(c.problems))
    ffn = [f"{n} ({type(c).__name__})" for n, c in block.named_children() if _linears(c)]
    raise _refuse(f"{where} has no gated MLP (no child with gate/up/down or fused gate_up Linear layers; "
                  f"children with Linear layers: {', '.join(ffn) or 'none'})")


# ------------------------------------------------------------------------- the probe


def _probe_input(hidden: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1, 16, H] random rows at scales from 0.05 to 30: large enough to reach a clamp or a
    saturation that small inputs would never show."""
    g = torch.Generator().manual_seed(1234)
    top = 1.0 if dtype == torch.float16 else 1.5
    scales = torch.logspace(-1.3, top, 16)[:, None]
    return (torch.randn(16, hidden, generator=g) * scales).to(device=device, dtype=dtype)[None]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    if torch.equal(got, want):
        return 0.0
    if got.shape != want.shape or not torch.isfinite(got).all() or not torch.isfinite(want).all():
        return float("inf")
    scale = float(want.abs().max().float()) or 1.0
    return float((got - want).abs().max().float()) / scale


@torch.no_grad()
def _prove(cand: _Candidate, where: str) -> Tuple[MLPFamily, str, Optional[nn.Module]]:
    """(family, kernel activation, activation module) of the reading that reproduces the module's
    own forward; ``UnsupportedModelError`` when none does."""
    module = cand.module
    if cand.activations:
        act_name, act = cand.activations[0]
        try:
            kernel = kernel_activation(act)
        except UnknownActivation as exc:
            raise _refuse(f"{where}: {cand.name}.{act_name}: {exc}") from None
        acts = [(kernel, act, act_name)]
    else:
        acts = [(k, fn, None) for k, fn in _FUNCTIONAL_ACTIVATIONS]
    ref = cand.readings[0]
    w = (getattr(module, ref.gate_up_name) if ref.fused_gate_up else getattr(module, ref.gate_name)).weight
    if w.is_meta:  # offloaded / not materialised: only a reading the names make unambiguous
        family = cand.readings[0]
        named = len(cand.readings) == 1 or (not family.fused_gate_up and family.gate_name in _GATE_HINTS
                                            and cand.readings[1].gate_name not in _GATE_HINTS)
        if not named or len(acts) > 1:
            raise _refuse(f"{where}: {cand.name} is on the meta device and its reading is ambiguous without running "
                          "it (materialise the weights, or register its family)")
        return _with_act(family, acts[0][2]), acts[0][0], acts[0][1] if isinstance(acts[0][1], nn.Module) else None
    # the probe compares the module with our reading in the weights' own dtype, whatever autocast
    # the caller runs under (patch inside an autocast block)
    with torch.autocast(w.device.type, enabled=False):
        return _prove_by_probe(module, cand, acts, w, where)


def _prove_by_probe(module: nn.Module, cand: _Candidate, acts, w: torch.Tensor,
                    where: str) -> Tuple[MLPFamily, str, Optional[nn.Module]]:
    x = _probe_input(w.shape[1], w.dtype, w.device)
    x2 = x.reshape(-1, x.shape[-1])
    try:
        want = type(module).forward(module, x)
    except Exception as exc:  # noqa: BLE001 - any failure means: not an MLP(x) -> y module
        raise _refuse(f"{where}: calling {type(module).__name__}.forward(hidden_states) failed "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}): not a plain MLP") from None
    if not isinstance(want, torch.Tensor) or want.shape != x.shape:
        raise _refuse(f"{where}: {type(module).__name__}.forward(hidden_states) does not return a tensor of the "
                      "input's shape: not a plain MLP")
    best = (float("inf"), None, None)
    for family, (kernel, act, act_name) in itertools.product(cand.readings, acts):
        gate, up = family.gate_up(module, x2)
        got = family.down(module, act(gate) * up).reshape(want.shape)
        err = _relative_error(got, want)
        if err < best[0]:
            best = (err, _with_act(family, act_name), (kernel, act))
    err, family, found = best
    if family is None or err > _PROBE_TOLERANCE.get(w.dtype, 1e-5):
        reading = "" if family is None else (f" with the closest reading ({_describe(family)}, relative "
                                            f"difference {err:.2g})")
        raise _refuse(f"{where}: {type(module).__name__}.forward is not down(act(gate(x)) * up(x)){reading}: it "
                      "computes something else (clamps, scales, extra terms or another activation)")
    kernel, act = found
    return family, kernel, act if isinstance(act, nn.Module) else None


def _with_act(family: MLPFamily, act_name: Optional[str]) -> MLPFamily:
    import dataclasses

    return dataclasses.replace(family, act_name=act_name)


def _describe(family: MLPFamily) -> str:
    if family.fused_gate_up:
        return f"{family.gate_up_name} as {family.fused_layout}"
    return f"gate {family.gate_name}, up {family.up_name}"


# ------------------------------------------------------------------------- the whole model


def _refuse_model(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise _refuse(f"{type(model).__name__} (model_type {model_type(model)!r}) is an encoder-decoder: "
                      "only decoder-only language models are supported")


def discover(model: nn.Module, probe: bool = True) -> Discovery:
    """Find and prove every decoder layer's gated MLP (``UnsupportedModelError`` says why not).

    ``probe=False`` reads structure only (no forward runs): for naming modules of a model already
    proven (patched), never to accept one."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    _refuse_model(model)
    override = family_override(model)
    body, layers, path = _find_layers(model)
    found: List[GatedMLP] = []
    experts: List[ExpertsFFN] = []
    for index, block in enumerate(layers):
        where = f"model_type {model_type(model)!r}, decoder layer {path}.{index}"
        block_where = f"model_type {model_type(model)!r}, {type(block).__name__} {path}.{index}"
        if _moe_children(block):
            cand, experts_path, experts_module = _pick_moe(block, block_where, override)
            try:
                experts.append(prove_experts(experts_module, index, f"{path}.{index}.{experts_path}", where,
                                             probe=probe))
            except UnsupportedModelError as exc:
                raise _refuse(str(exc)) from None
            if cand is None:
                continue
        else:
            cand = _pick(block, block_where, override)
        if probe:
            family, kernel, act_module = _prove(cand, where)
        else:
            family = cand.readings[0]
            act_name, act = cand.activations[0] if cand.activations else (None, None)
            family, kernel = _with_act(family, act_name), (kernel_activation(act) if act is not None else "")
            act_module = act if isinstance(act, nn.Module) else None
        found.append(GatedMLP(index, f"{path}.{index}.{cand.name}", cand.module, family, kernel, act_module))
    if experts and found and len(found) != len(layers):
        dense = [m.layer_index for m in found]
        raise _refuse(f"model_type {model_type(model)!r}: dense gated MLPs in decoder layers {dense} only, of "
                      f"{len(layers)} (a dense layer beside mixture-of-experts layers without a shared expert is not "
                      "supported yet: the dense statistics are one [layers, intermediate] array)")
    if not found and not experts:
        raise _refuse(f"model_type {model_type(model)!r} has no gated MLP and no experts")
    _refuse_shared(found)
    _refuse_shared_experts(experts)
    probed = probe and not any(m.family.weights(m.module)[0].is_meta for m in found) and \
        not any(x.module.gate_up_proj.is_meta for x in experts)
    return Discovery(model_type(model), body, layers, path, tuple(found), probed, tuple(experts))


def _refuse_shared_experts(experts: Sequence[ExpertsFFN]) -> None:
    seen = {}
    for x in experts:
        first = seen.setdefault(id(x.module), x.layer_index)
        if first != x.layer_index:
            raise _refuse(f"decoder layers {first} and {x.layer_index} share one experts module ({x.path})")
    shapes = {(x.num_experts, x.intermediate_size, x.hidden_size) for x in experts}
    if len(shapes) > 1:
        raise _refuse(f"the experts of different layers differ in shape ([experts, intermediate, hidden] = "
                      f"{sorted(shapes)}): expert statistics are one [layers, experts, intermediate] array")


def _refuse_shared(mlps: Sequence[GatedMLP]) -> None:
    """Per-layer counts and per-layer trained slices need one MLP, with its own weights, per layer."""
    seen_module, seen_weight = {}, {}
    for m in mlps:
        first = seen_module.setdefault(id(m.module), m.layer_index)
        if first != m.layer_index:
            raise _refuse(f"decoder layers {first} and {m.layer_index} share one MLP module ({m.path}): per-layer "
                          "neurons would be ambiguous")
        for w in m.family.weights(m.module):
            w = w.to_local() if hasattr(w, "to_local") else w  # FSDP2's DTensor: the shard this rank holds
            if w.is_meta or w.numel() == 0:
                continue
            key = (w.untyped_storage().data_ptr(), w.storage_offset())
            first = seen_weight.setdefault(key, m.layer_index)
            if first != m.layer_index:
                raise _refuse(f"decoder layers {first} and {m.layer_index} share (tie) MLP weights: per-layer neurons "
                              "would be ambiguous")


def mlp_modules(model: nn.Module) -> List[nn.Module]:
    """Each decoder layer's MLP module, by structure only (no forward runs)."""
    return [m.module for m in discover(model, probe=False).mlps]


def family_for(model: nn.Module) -> MLPFamily:
    """The (proven) family of the model's MLPs; ``UnsupportedModelError`` when there is none
    (also for a mixture-of-experts model without dense MLPs: its experts have no MLP family)."""
    found = discover(model)
    if not found.mlps:
        raise _refuse(f"model_type {found.model_type!r} has no dense gated MLP (only mixture-of-experts layers, "
                      "whose stacked experts are no MLP family)")
    return found.mlps[0].family


class MLPShape(NamedTuple):
    """A model's gated MLPs as its weights are: the shape every neuron index refers to."""

    num_layers: int
    hidden_size: int
    intermediate_size: int


def mlp_shape(model: nn.Module) -> MLPShape:
    """(layers, hidden, intermediate) read from the MLP weights of every decoder layer (patched
    or not; by structure, no forward runs); ``(0, hidden, 0)`` for a mixture-of-experts model
    without dense MLPs (its neurons are in :func:`expert_shape`). Layers of different MLP sizes are an error:
    statistics, neuron sets and trainable slices are [layers, intermediate] arrays."""
    found = discover(model, probe=False)
    mlps = found.mlps
    if not mlps:  # every layer is a mixture of experts without a dense (shared) MLP
        return MLPShape(0, found.experts[0].hidden_size, 0)
    sizes = {tuple(m.family.weights(m.module)[0].shape) for m in mlps}
    if len(sizes) != 1:
        raise ValueError(f"the MLPs of {type(model).__name__} differ in size ([intermediate, hidden] = "
                         f"{sorted(sizes)}): one intermediate size for all layers is needed")
    intermediate, hidden = sizes.pop()
    return MLPShape(len(mlps), int(hidden), int(intermediate))


def expert_shape(model: nn.Module) -> Optional[ExpertShape]:
    """(MoE layer indices, experts, hidden, expert intermediate) of a model's routed experts, read
    from their weights (by structure); None for a dense model."""
    experts = discover(model, probe=False).experts
    if not experts:
        return None
    x = experts[0]
    return ExpertShape(tuple(e.layer_index for e in experts), x.num_experts, x.hidden_size, x.intermediate_size)

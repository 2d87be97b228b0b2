"""LAPE language-neuron identification (Tang et al. 2024), from per-language activation counts.

Same selection as the reference ``identify.py`` of RUCAIBox/Language-Specific-Neurons, in
float32, step for step (so ties resolve identically): activation probabilities, entropy of
their distribution over languages, a filter that drops neurons no language activates often,
the lowest-entropy ``top_rate`` of neurons, then each selected neuron is assigned to every
language whose probability is above a bar.

All languages' statistics must come from one model: their fingerprints (``meta``, written by
``record``) must agree, and the resulting set carries that fingerprint.

Mixture-of-experts models: the units are the dense MLPs' neurons (a shared expert's included)
and every (MoE layer, expert, neuron) of the routed experts, and the rule above runs once over
all of them (``_lape_select`` on one flattened unit axis): one entropy ranking, one filter and
one bar. An expert neuron's probability is ``over_zero / routed`` of that expert and language
(``ExpertStats.activation_probability``: relative to the tokens the router sent to the expert),
so it is on the dense neurons' scale ("active when computed"); an expert a language routes no
token to has probability 0 for that language (no evidence of activity; the set's notes count
such pairs).
"""
from __future__ import annotations

import numbers
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..fingerprint import check_one_model, recorded_model
from ..languages import check_languages
from ..stats.experts import ExpertStats
from ..stats.values import ActivationStats, check_same_shape
from .neuron_set import NeuronSet

__all__ = ["identify", "lape_probabilities", "expert_probabilities"]


def _as_stats(lang: str, stats: Any) -> ActivationStats:
    """An ActivationStats-like object or a LAPE reference dict, checked by ActivationStats' own
    rules (errors prefixed with the language), with at least one token."""
    try:
        if isinstance(stats, ActivationStats):
            out = stats
        elif isinstance(stats, Mapping):
            out = ActivationStats.from_lape_dict(stats)
        elif hasattr(stats, "over_zero") and hasattr(stats, "n_tokens"):
            out = ActivationStats(stats.over_zero, None, stats.n_tokens, getattr(stats, "meta", None) or {},
                                  experts=getattr(stats, "experts", None))
        else:
            raise TypeError(f"expected ActivationStats (.over_zero, .n_tokens) or {{'n': int, 'over_zero': tensor}}, "
                            f"got {type(stats).__name__}")
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"stats[{lang!r}]: {exc}") from None
    if out.n_tokens <= 0:
        raise ValueError(f"stats[{lang!r}]: n (tokens counted) must be > 0, got {out.n_tokens}")
    if (out.intermediate_size == 0 or out.num_layers == 0) and (out.experts is None or out.num_layers != 0):
        raise ValueError(f"stats[{lang!r}]: over_zero must be 2-D [layers, intermediate] and not empty (empty only "
                         f"for a mixture-of-experts model without dense MLPs), got shape {tuple(out.shape)}")
    return out


def _check_rate(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 < float(value) <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def lape_probabilities(stats: Mapping[str, Any]) -> torch.Tensor:
    """float32 ``[L, I, K]`` activation probabilities ``over_zero_k / n_k`` of the dense MLPs
    (languages in mapping order); the experts': ``expert_probabilities``."""
    over_zero, n, _, _ = _stack(stats)
    return _probabilities(over_zero, n)


def expert_probabilities(stats: Mapping[str, Any]) -> torch.Tensor:
    """float32 ``[M, E, I_e, K]``: each expert neuron's activation probability over the tokens
    routed to its expert (``ExpertStats.activation_probability``, 0 where a language routed none),
    languages in mapping order. An error for statistics without experts."""
    _, _, _, experts = _stack(stats)
    if experts is None:
        raise ValueError("expert_probabilities: these statistics have no experts (a dense model)")
    return torch.stack([ex.activation_probability() for ex in experts], dim=-1)


def _probabilities(over_zero: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    # integer true division, as the reference: float32, n rounded to float32 first (n > 2**24
    # is not exact), one rounding of the quotient
    return over_zero / n


def _stack(stats: Mapping[str, Any]):
    if not isinstance(stats, Mapping):
        raise TypeError(f"stats must be a mapping language -> ActivationStats or reference dict, got {type(stats).__name__}")
    if len(stats) == 0:
        raise ValueError("stats is empty: need at least one language")
    languages = check_languages(list(stats))
    checked = {lang: _as_stats(lang, stats[lang]) for lang in languages}
    check_same_shape(checked, "identify neurons from")
    counts = [s.over_zero.detach().cpu() for s in checked.values()]  # topk on the CPU, as the reference
    ns = [s.n_tokens for s in checked.values()]
    metas = [s.meta for s in checked.values()]
    experts: Optional[List[ExpertStats]] = None
    if next(iter(checked.values())).experts is not None:  # check_same_shape: all or none have experts
        experts = [s.experts for s in checked.values()]
    # Layout [L, I, K] and integer true division, exactly as the reference: float32 probabilities,
    # and the sums over languages below reduce a contiguous last dimension in the same order.
    return torch.stack(counts, dim=-1), torch.tensor(ns, dtype=torch.int64), metas, experts


def _lape_select(probs: torch.Tensor, top_rate: float, filter_rate: float, activation_bar_ratio: float,
                 units: str) -> Tuple[torch.Tensor, float, float]:
    """The LAPE rule on float32 probabilities ``[U, K]`` (U units, K languages): (membership bool
    ``[U, K]``, filter_value, activation_bar). See ``identify`` for the steps."""
    num_units = probs.shape[0]
    total = probs.numel()
    k_filter = round(total * filter_rate)
    k_bar = round(total * activation_bar_ratio)
    k_select = round(num_units * top_rate)
    if k_filter == 0 or k_bar == 0:
        raise ValueError(f"filter_rate={filter_rate} / activation_bar_ratio={activation_bar_ratio} select no value "
                         f"of the {total} probabilities (round(N * rate) == 0)")
    if k_select == 0:
        raise ValueError(f"top_rate={top_rate} selects round({units}*{top_rate}) = 0 neurons")

    normed = probs / probs.sum(dim=-1, keepdim=True)
    normed = torch.where(torch.isnan(normed), torch.zeros((), dtype=normed.dtype), normed)
    log_normed = torch.where(normed > 0, normed.log(), torch.zeros((), dtype=normed.dtype))
    entropy = -torch.sum(normed * log_normed, dim=-1)  # [U]

    flat_probs = probs.flatten()
    filter_value = flat_probs.kthvalue(k_filter).values.item()
    entropy[(probs > filter_value).sum(dim=-1) == 0] = torch.inf

    _, index = entropy.topk(k_select, largest=False)
    activation_bar = flat_probs.kthvalue(k_bar).values.item()

    # membership[u, k]: unit u selected and p > bar for language k
    chosen = torch.zeros(num_units, dtype=torch.bool)
    chosen[index] = True
    return (probs > activation_bar) & chosen.view(num_units, 1), filter_value, activation_bar


def identify(
    stats: Mapping[str, Any],
    top_rate: float = 0.01,
    filter_rate: float = 0.95,
    activation_bar_ratio: float = 0.95,
    *,
    model_id: Optional[str] = None,
    hidden_size: Optional[int] = None,
) -> NeuronSet:
    """Language-specific neurons by LAPE.

    ``stats``: ``language -> ActivationStats`` (anything with ``.over_zero`` int ``[L, I]`` and
    ``.n_tokens``) or the reference dict ``{'n': int, 'over_zero': tensor [L, I]}``.
    With ``p[l, i, k] = over_zero_k[l, i] / n_k`` (float32):

    - entropy of ``q = p / sum_k p`` (0 where the sum is 0), with ``0 log 0 = 0``;
    - ``t`` = the ``round(N * filter_rate)``-th smallest of all ``N = L*I*K`` values of ``p``;
      a neuron with no ``p > t`` gets entropy ``+inf``;
    - the ``round(L*I*top_rate)`` neurons of smallest entropy (``torch.topk``, CPU, so ties at
      the cut resolve as in the reference);
    - ``b`` = the ``round(N * activation_bar_ratio)``-th smallest value of ``p``; a selected
      neuron belongs to every language with ``p > b`` (possibly several, possibly none).

    ``round`` is Python's (half to even), as in the reference. Difference from the reference:
    every input language is in the result, also one with no neurons (the reference's output
    list drops trailing languages with no neurons, which shifts nothing but loses them).
    The thresholds used are kept in ``NeuronSet.thresholds`` (``filter_value``, ``activation_bar``).

    Statistics with experts (``stats[lang].experts``, a mixture-of-experts model): the units are
    the ``L*I`` dense neurons followed by the ``M*E*I_e`` expert neurons, with the expert
    probabilities ``over_zero / routed`` (0 where the language routed no token to the expert); all
    steps above run once over all units (one ranking: ``N = (L*I + M*E*I_e)*K``), and the set
    holds the selected expert neurons (``NeuronSet.experts``, ``select_experts``).

    Statistics of different models (different fingerprints) are refused with an error naming two
    languages and their models; statistics without a fingerprint (LAPE dicts, older files) are
    accepted and listed in the set's ``notes``.
    """
    top_rate = _check_rate("top_rate", top_rate)
    filter_rate = _check_rate("filter_rate", filter_rate)
    activation_bar_ratio = _check_rate("activation_bar_ratio", activation_bar_ratio)
    over_zero, n, metas, experts = _stack(stats)
    languages = list(stats)
    fingerprint, fingerprint_name, notes = _one_model(stats, languages, metas)
    num_layers, inter, num_langs = over_zero.shape

    probs = _probabilities(over_zero, n).view(num_layers * inter, num_langs)  # float32 [L*I, K]
    units = f"{num_layers}*{inter}"
    expert_kwargs: Dict[str, Any] = {}
    if experts is not None:  # one ranking over dense and expert units
        ex = experts[0]
        expert_probs = torch.stack([x.activation_probability() for x in experts], dim=-1)  # [M, E, I_e, K]
        probs = torch.cat([probs, expert_probs.view(-1, num_langs)])
        units = f"({units} + {'*'.join(map(str, ex.shape))})"
        unrouted = sum(int((x.routed == 0).sum()) for x in experts)
        if unrouted:
            notes.append(f"{unrouted} (MoE layer, expert, language) triples had no token routed: their neurons' "
                         "probability is 0 for that language")
    membership, filter_value, activation_bar = _lape_select(probs, top_rate, filter_rate, activation_bar_ratio, units)

    dense = membership[: num_layers * inter].view(num_layers, inter, num_langs)
    neurons: Dict[str, list] = {}
    for k, lang in enumerate(languages):
        neurons[lang] = [torch.nonzero(dense[layer, :, k], as_tuple=True)[0] for layer in range(num_layers)]
    if experts is not None:
        M, E, I_e = experts[0].shape
        moe = membership[num_layers * inter:].view(M, E, I_e, num_langs)
        expert_kwargs = {
            "expert_layout": (experts[0].layers, E, I_e),
            "experts": {lang: [[torch.nonzero(moe[m, e, :, k], as_tuple=True)[0] for e in range(E)] for m in range(M)]
                        for k, lang in enumerate(languages)},
        }

    if model_id is None:
        names = {recorded_model(m)[1] for m in metas} - {None}
        model_id = fingerprint_name if fingerprint_name is not None else (names.pop() if len(names) == 1 else None)
    if hidden_size is None:
        hs = {m.get("hidden_size") for m in metas if isinstance(m, Mapping)} - {None}
        hidden_size = int(next(iter(hs))) if len(hs) == 1 else None
    return NeuronSet(
        neurons, num_layers, inter,
        model_id=model_id, hidden_size=hidden_size,
        thresholds={
            "top_rate": top_rate, "filter_rate": filter_rate, "activation_bar_ratio": activation_bar_ratio,
            "filter_value": filter_value, "activation_bar": activation_bar,
        },
        tokens_per_language={lang: int(v) for lang, v in zip(languages, n.tolist())},
        notes=notes, model_fingerprint=fingerprint, **expert_kwargs,
    )


def _one_model(stats: Mapping[str, Any], languages, metas):
    """(fingerprint, model name, notes): the one model all languages' statistics come from."""
    labels = []
    for lang in languages:
        source = getattr(stats[lang], "source", None)
        labels.append(f"language {lang!r}" + (f" ({source})" if source else ""))
    fingerprint, name, notes = check_one_model(
        {label: recorded_model(m) for label, m in zip(labels, metas)}, "identify neurons from")
    names = sorted({recorded_model(m)[1] for m in metas} - {None})
    if len(names) > 1:
        notes.append(f"the statistics name {len(names)} model paths ({', '.join(map(repr, names))})"
                     + (": one model by its fingerprint (moved or copied)" if fingerprint else ""))
    return fingerprint, name, notes

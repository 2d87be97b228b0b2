"""Language neurons: ``NeuronSet`` (per-language, per-layer neuron indices, expert neurons of
mixture-of-experts models, and their files, and
``check_layer_indices``, the one rule for a layer's indices), ``identify`` (LAPE, from
statistics), ``deactivate`` (the ablation) and reports."""
from .ablation import deactivate
from .identification import expert_probabilities, identify, lape_probabilities
from .indices import ExpertLayout, PerExpert
from .neuron_set import NeuronSet, NeuronSetFormatError, check_layer_indices
from .report import per_layer_table, plot_expert_heatmap, plot_heatmap

__all__ = ["NeuronSet", "NeuronSetFormatError", "ExpertLayout", "PerExpert", "check_layer_indices", "identify",
           "lape_probabilities", "expert_probabilities",
           "deactivate", "per_layer_table", "plot_heatmap", "plot_expert_heatmap"]

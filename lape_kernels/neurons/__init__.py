"""Language neurons: ``NeuronSet`` (per-language, per-layer neuron indices and their files, and
``check_layer_indices``, the one rule for a layer's indices), ``identify`` (LAPE, from
statistics), ``deactivate`` (the ablation) and reports."""
from .ablation import deactivate
from .identification import identify, lape_probabilities
from .neuron_set import NeuronSet, NeuronSetFormatError, check_layer_indices
from .report import per_layer_table, plot_heatmap

__all__ = ["NeuronSet", "NeuronSetFormatError", "check_layer_indices", "identify", "lape_probabilities",
           "deactivate", "per_layer_table", "plot_heatmap"]

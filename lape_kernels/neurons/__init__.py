"""Language neurons: ``NeuronSet`` (per-language, per-layer neuron indices and their files),
``identify`` (LAPE, from statistics), ``deactivate`` (the ablation) and reports."""
from .deactivate import deactivate
from .identification import identify, lape_probabilities
from .neuron_set import NeuronSet, NeuronSetFormatError
from .report import per_layer_table, plot_heatmap

__all__ = ["NeuronSet", "NeuronSetFormatError", "identify", "lape_probabilities", "deactivate",
           "per_layer_table", "plot_heatmap"]

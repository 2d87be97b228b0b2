"""LAPE statistics: the values (``ActivationStats``, ``StatsByLanguage``) and ``record``,
which collects them from a patched model's forward."""
from .recorder import record
from .values import ActivationStats, StatsByLanguage

__all__ = ["ActivationStats", "StatsByLanguage", "record"]

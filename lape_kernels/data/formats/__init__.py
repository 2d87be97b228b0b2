"""File formats the corpus sources ship their translations in, one module per format: gettext
.po (Django), Fluent .ftl and .properties (Firefox), Mallard pages (GNOME help).

Pure text -> structure functions: no files, no packages, no corpus rules.
"""

from .fluent import parse_fluent, resolve_fluent
from .mallard import mallard_units
from .po import PoEntry, parse_po, po_segments
from .properties import parse_properties

__all__ = [
    "PoEntry",
    "mallard_units",
    "parse_fluent",
    "parse_po",
    "parse_properties",
    "po_segments",
    "resolve_fluent",
]

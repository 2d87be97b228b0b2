"""The installed version (declared once, in pyproject.toml)."""
from importlib.metadata import PackageNotFoundError, version as _installed_version

try:
    __version__ = _installed_version("lape_kernels")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

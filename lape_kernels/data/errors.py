"""The data room's own error, raised by package fetching, package reading and the corpus build
alike (so callers catch one type whatever step failed)."""

__all__ = ["CorpusSourceError"]


class CorpusSourceError(RuntimeError):
    """A source package could not be fetched or read."""

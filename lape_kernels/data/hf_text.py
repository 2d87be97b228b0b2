"""Any Hugging Face ``datasets`` input as a DatasetDict with a 'text' column: the way to bring
one's own corpus instead of the built-in one.

Why one loader for many inputs: the experiment takes a corpus spec from the command line; a
saved dataset, a folder of text files and a dataset name should all just work. A file that
cannot be read (empty, not UTF-8, malformed) is an error naming the file and the cause: the
``datasets`` library's own message ("An error occurred while generating the dataset") names
neither.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Sequence

from .splits import split_of

__all__ = ["load_text_dataset"]

_FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json",
                  ".csv": "csv", ".parquet": "parquet"}
# a file's split, from the first of these words in its name ("valid"/"val" mean validation)
_SPLIT_WORDS = ("validation", "valid", "val", "test", "train")


def load_text_dataset(spec, text_column: str = "text", val_fraction: float | None = None,
                      seed: int = 0, **load_kwargs):
    """A DatasetDict with a 'text' column from any datasets input.

    `spec`: a Dataset/DatasetDict; a directory saved with save_to_disk; a text/json/csv/parquet
    file, a list of files, a dict split -> file(s), or a directory of such files; or a dataset
    name that `load_dataset` resolves offline. `text_column` is renamed to 'text'. With
    `val_fraction` and no 'validation' split, one is carved from 'train' by a hash of the text.
    """
    dd = _load_any(spec, load_kwargs)
    dd = _with_text_column(dd, text_column)
    if val_fraction is not None and "validation" not in dd:
        if not (0.0 < val_fraction < 1.0):
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if "train" not in dd:
            raise ValueError(f"cannot carve a validation split: no 'train' split in {list(dd)}")
        train = dd["train"]
        is_val = [split_of(t or "", val_fraction, seed) == "validation" for t in train["text"]]
        dd["validation"] = train.select([i for i, v in enumerate(is_val) if v])
        dd["train"] = train.select([i for i, v in enumerate(is_val) if not v])
    return dd


def _load_any(spec, load_kwargs):
    """`spec` (see load_text_dataset) as a DatasetDict, columns untouched."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if isinstance(spec, (Dataset, DatasetDict)):
        return _as_dataset_dict(spec)
    if isinstance(spec, (dict, list, tuple)) and spec:
        files = list(spec.values()) if isinstance(spec, dict) else list(spec)
        flat = [f for v in files for f in ([v] if isinstance(v, (str, os.PathLike)) else v)]
        builder = _builder_for([Path(f) for f in flat])
        data_files = ({k: ([str(x) for x in v] if isinstance(v, (list, tuple)) else str(v))
                       for k, v in spec.items()} if isinstance(spec, dict)
                      else {"train": [str(f) for f in flat]})
        return _load_files(builder, data_files, load_kwargs)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a Dataset, DatasetDict, path, list/dict of files or a "
                        f"dataset name, got {type(spec).__name__}")
    p = Path(spec).expanduser()
    if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
        return _as_dataset_dict(load_from_disk(str(p)))
    if p.is_file():
        return _load_files(_builder_for([p]), {"train": str(p)}, load_kwargs)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _FILE_BUILDERS)
        if not files:
            raise ValueError(f"{p} is neither a saved dataset nor holds text/json/csv/parquet files")
        splits: dict[str, list[str]] = {}
        for f in files:
            stem = f.stem.lower()
            name = next((s for s in _SPLIT_WORDS if s in stem), "train")
            name = "validation" if name in ("valid", "val") else name
            splits.setdefault(name, []).append(str(f))
        return _load_files(_builder_for(files), splits, load_kwargs)
    try:
        loaded = load_dataset(str(spec), **load_kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the reason attached
        raise ValueError(f"cannot load dataset {spec!r}: not a path and load_dataset "
                         f"failed ({type(e).__name__}: {e})") from e
    return _as_dataset_dict(loaded)


def _load_files(builder: str, data_files: dict, load_kwargs):
    """``load_dataset(builder, data_files=...)``, each text file checked first (not empty, UTF-8),
    and a failure of the builder reported with the files and its cause."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    files = [str(f) for v in data_files.values() for f in ([v] if isinstance(v, (str, os.PathLike)) else v)]
    for f in files:
        if not os.path.isfile(f):  # a glob pattern or a URL: the builder resolves it
            continue
        if builder == "text":
            _check_text_file(Path(f), load_kwargs.get("encoding") or "utf-8", load_kwargs.get("encoding_errors") or "strict")
        elif os.path.getsize(f) == 0:
            raise ValueError(f"{f}: empty {builder} file (0 bytes): nothing to read")
    try:
        return load_dataset(builder, data_files=data_files, **load_kwargs)
    except DatasetGenerationError as e:
        cause = e.__cause__ or e.__context__ or e
        where = files[0] if len(files) == 1 else f"{len(files)} {builder} files ({', '.join(files[:3])}" + (
            ", ...)" if len(files) > 3 else ")")
        raise ValueError(f"{where}: cannot read as {builder}: {type(cause).__name__}: "
                         f"{' '.join(str(cause).split())}") from None


def _check_text_file(path: Path, encoding: str, errors: str = "strict", chunk: int = 1 << 20) -> None:
    """Raise ValueError naming ``path`` if it holds no text or is not valid ``encoding`` (read
    the way the text builder will: ``errors`` is its ``encoding_errors``)."""
    decoder = codecs.getincrementaldecoder(encoding)(errors)
    offset, has_text = 0, False
    with open(path, "rb") as fh:
        while True:
            data = fh.read(chunk)
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not valid {encoding} text: byte 0x{e.object[e.start]:02x} at offset "
                                 f"{offset - pending + e.start} ({e.reason}); re-encode the file as {encoding}") from None
            has_text = has_text or bool(text.strip())
            if not data:
                break
            offset += len(data)
    if not has_text:
        raise ValueError(f"{path}: empty text file ({offset} bytes, no text): nothing to read")


def _as_dataset_dict(loaded):
    """A lone Dataset becomes the 'train' split of a DatasetDict."""
    from datasets import DatasetDict

    return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})


def _with_text_column(dd, text_column: str):
    """Each split with `text_column` renamed to 'text' (a column already called 'text' is
    replaced)."""
    from datasets import DatasetDict

    fixed = {}
    for name, ds in dd.items():
        if text_column not in ds.column_names:
            raise ValueError(f"split {name!r} has no column {text_column!r}; columns: {ds.column_names}")
        if text_column != "text":
            if "text" in ds.column_names:
                ds = ds.remove_columns("text")
            ds = ds.rename_column(text_column, "text")
        fixed[name] = ds
    return DatasetDict(fixed)


def _builder_for(paths: Sequence[Path]) -> str:
    """The datasets builder ('text', 'json', 'csv', 'parquet') for files of one kind."""
    kinds = {_FILE_BUILDERS.get(p.suffix.lower()) for p in paths}
    if None in kinds:
        bad = [str(p) for p in paths if p.suffix.lower() not in _FILE_BUILDERS]
        raise ValueError(f"unsupported file type(s) {bad}; use one of {sorted(_FILE_BUILDERS)}")
    if len(kinds) != 1:
        raise ValueError(f"mixed file types {sorted(kinds)}; pass one kind of file")
    return kinds.pop()

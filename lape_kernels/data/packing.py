"""Pack documents into fixed-length token rows (no padding) for activation collection and
training.

Why packing: every position of every row is a real token, so collection counts and training
losses waste no compute on padding and need no attention mask. The stream is
``doc0 EOS doc1 EOS doc2 EOS ...``; each row is ``[BOS] + next (seq_len - 1) stream tokens``
(or ``seq_len`` stream tokens without BOS). A trailing partial row is dropped. Order is the
order of `texts`, so the result is deterministic.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

__all__ = ["iter_packed_batches", "iter_packed_rows", "pack_tokens"]

_TOKENIZE_CHUNK = 256


def _special_ids(tokenizer, add_bos: bool, bos_id, eos_id) -> tuple[int | None, int]:
    if tokenizer is not None:
        bos_id = tokenizer.bos_token_id if bos_id is None else bos_id
        eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos_id is None:
        raise ValueError("eos_id is required: the tokenizer has no eos_token_id (pass eos_id=)")
    if add_bos and bos_id is None:
        raise ValueError("add_bos=True but the tokenizer has no bos_token_id (pass bos_id= or "
                         "add_bos=False)")
    return (int(bos_id) if add_bos else None), int(eos_id)


def _token_stream(tokenizer, texts: Iterable, eos_id: int) -> Iterator[list[int]]:
    """Per document: its token ids followed by EOS."""
    if tokenizer is None:
        for doc in texts:
            if isinstance(doc, str):
                raise TypeError("tokenizer=None needs token-id sequences, got a str")
            ids = doc.tolist() if isinstance(doc, torch.Tensor) else list(doc)
            yield [int(t) for t in ids] + [eos_id]
        return
    chunk: list[str] = []

    def flush():
        enc = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        for ids in enc:
            yield list(ids) + [eos_id]

    for doc in texts:
        if not isinstance(doc, str):
            raise TypeError(f"texts must be strings when a tokenizer is given, got {type(doc).__name__}")
        chunk.append(doc)
        if len(chunk) >= _TOKENIZE_CHUNK:
            yield from flush()
            chunk = []
    if chunk:
        yield from flush()


def iter_packed_rows(tokenizer, texts: Iterable, seq_len: int, add_bos: bool = True,
                     max_tokens: int | None = None, *, bos_id: int | None = None,
                     eos_id: int | None = None) -> Iterator[list[int]]:
    """Rows (lists of seq_len ids) of the packed stream; at most max_tokens // seq_len rows."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < (2 if add_bos else 1):
        raise ValueError(f"seq_len must be an int >= {2 if add_bos else 1}, got {seq_len!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 0):
        raise ValueError(f"max_tokens must be a non-negative int or None, got {max_tokens!r}")
    bos, eos = _special_ids(tokenizer, add_bos, bos_id, eos_id)
    max_rows = None if max_tokens is None else max_tokens // seq_len
    if max_rows == 0:
        return
    body = seq_len - (1 if add_bos else 0)
    buf: list[int] = []
    n = 0
    for ids in _token_stream(tokenizer, texts, eos):
        buf.extend(ids)
        while len(buf) >= body:
            row, buf = buf[:body], buf[body:]
            yield ([bos] + row) if add_bos else row
            n += 1
            if max_rows is not None and n >= max_rows:
                return


def pack_tokens(tokenizer, texts: Iterable, seq_len: int, add_bos: bool = True,
                max_tokens: int | None = None, *, bos_id: int | None = None,
                eos_id: int | None = None) -> torch.Tensor:
    """LongTensor [N, seq_len] of packed rows (see module doc). `tokenizer=None`: `texts` are
    already token-id sequences and `eos_id` (and `bos_id` with add_bos) must be given."""
    rows = list(iter_packed_rows(tokenizer, texts, seq_len, add_bos, max_tokens,
                                 bos_id=bos_id, eos_id=eos_id))
    if not rows:
        return torch.empty((0, seq_len), dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long)


def iter_packed_batches(tokenizer, texts: Iterable, seq_len: int, batch_size: int,
                        add_bos: bool = True, max_tokens: int | None = None,
                        drop_last: bool = False, *, bos_id: int | None = None,
                        eos_id: int | None = None) -> Iterator[torch.Tensor]:
    """Streaming version of ``pack_tokens``: LongTensor batches [<=batch_size, seq_len] whose
    concatenation equals ``pack_tokens(...)`` (the last batch may be short unless drop_last)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    batch: list[list[int]] = []
    for row in iter_packed_rows(tokenizer, texts, seq_len, add_bos, max_tokens,
                                bos_id=bos_id, eos_id=eos_id):
        batch.append(row)
        if len(batch) == batch_size:
            yield torch.tensor(batch, dtype=torch.long)
            batch = []
    if batch and not drop_last:
        yield torch.tensor(batch, dtype=torch.long)

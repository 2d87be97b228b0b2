"""Token packing: fixed-length rows of the packed document stream."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lape_kernels.data import iter_packed_batches, pack_tokens
from lape_kernels.testing import tiny_tokenizer


def _reference_pack(docs, seq_len, add_bos, bos, eos, max_tokens=None):
    stream = [t for d in docs for t in list(d) + [eos]]
    body = seq_len - (1 if add_bos else 0)
    rows = [([bos] if add_bos else []) + stream[i:i + body]
            for i in range(0, len(stream) - body + 1, body)]
    if max_tokens is not None:
        rows = rows[: max_tokens // seq_len]
    return rows


@settings(max_examples=60, deadline=None)
@given(
    docs=st.lists(st.lists(st.integers(3, 99), max_size=20), max_size=12),
    seq_len=st.integers(2, 9),
    add_bos=st.booleans(),
    max_tokens=st.one_of(st.none(), st.integers(0, 120)),
    batch_size=st.integers(1, 4),
)
def test_pack_tokens_matches_reference(docs, seq_len, add_bos, max_tokens, batch_size):
    got = pack_tokens(None, docs, seq_len, add_bos, max_tokens, bos_id=1, eos_id=2)
    want = _reference_pack(docs, seq_len, add_bos, 1, 2, max_tokens)
    assert got.dtype == torch.long and got.shape == (len(want), seq_len)
    assert got.tolist() == want
    batches = list(iter_packed_batches(None, docs, seq_len, batch_size, add_bos, max_tokens,
                                       bos_id=1, eos_id=2))
    assert all(b.shape[0] <= batch_size for b in batches)
    cat = torch.cat(batches) if batches else torch.empty((0, seq_len), dtype=torch.long)
    assert torch.equal(cat, got)
    dropped = list(iter_packed_batches(None, docs, seq_len, batch_size, add_bos, max_tokens,
                                       drop_last=True, bos_id=1, eos_id=2))
    assert all(b.shape[0] == batch_size for b in dropped)
    assert len(dropped) == len(want) // batch_size


def test_pack_tokens_with_tokenizer_equals_pretokenized():
    tok = tiny_tokenizer()
    texts = ["The cat sat.", "", "A much longer second document, with punctuation!", "x"] * 40
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    a = pack_tokens(tok, texts, 16)
    b = pack_tokens(None, ids, 16, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
    assert torch.equal(a, b)
    assert (a[:, 0] == tok.bos_token_id).all()
    # every stream token is used exactly once: row bodies concatenate to a prefix of the stream
    stream = [t for d in ids for t in d + [tok.eos_token_id]]
    flat = a[:, 1:].reshape(-1).tolist()
    assert flat == stream[: len(flat)] and len(stream) - len(flat) < 15
    assert torch.equal(pack_tokens(tok, iter(texts), 16), a)  # generators work
    assert pack_tokens(tok, texts, 16, max_tokens=40).shape == (2, 16)


def test_pack_tokens_errors():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="seq_len"):
        pack_tokens(tok, ["a"], 1)
    with pytest.raises(ValueError, match="seq_len"):
        pack_tokens(tok, ["a"], 0, add_bos=False)
    with pytest.raises(ValueError, match="max_tokens"):
        pack_tokens(tok, ["a"], 4, max_tokens=-1)
    with pytest.raises(ValueError, match="eos_id"):
        pack_tokens(None, [[5, 6]], 4, bos_id=1)
    with pytest.raises(ValueError, match="bos"):
        pack_tokens(None, [[5, 6]], 4, eos_id=2)
    with pytest.raises(TypeError, match="token-id"):
        pack_tokens(None, ["text"], 4, bos_id=1, eos_id=2)
    with pytest.raises(TypeError, match="strings"):
        pack_tokens(tok, [[1, 2]], 4)
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_packed_batches(tok, ["a"], 4, 0))
    assert pack_tokens(tok, [], 4).shape == (0, 4)

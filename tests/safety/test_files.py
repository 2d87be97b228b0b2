"""The one output guard (`lape_kernels.files`): a lock per output held by one process at a time,
refused overlaps with inputs, refused replacement without --overwrite, content digests."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lape_kernels.files import (OutputError, check_output, claim_output, lock_path, output_lock, tensors_digest,
                                text_digest)

_HOLD = r'''
import sys
from lape_kernels.files import output_lock
with output_lock(sys.argv[1], "finetune"):
    print("locked", flush=True)
    sys.stdin.read()
'''


def test_lock_is_held_by_one_process_and_names_it(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert lock_path(out).exists()
        with pytest.raises(OutputError, match=rf"is being written by another process \(pid {holder.pid} on host .*"
                                              r"finetune, since .*\): wait for it to finish, or choose another"):
            with output_lock(out):
                pass
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not lock_path(out).exists()
    with output_lock(out, "collect") as lock:  # free again; released (and removed) at the end
        assert lock == lock_path(out) and lock.exists()
    assert not lock_path(out).exists()


def test_a_killed_holder_does_not_leave_a_lock(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait(timeout=60)
    assert lock_path(out).exists()  # the file stays, the lock went with the process
    with output_lock(out):
        pass


def test_inputs_and_kinds(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "f").write_text("x")
    for out, words in ((data, "is the input"), (data / "x", "is inside the input"), (tmp_path, "contains the input")):
        with pytest.raises(OutputError, match=words):
            check_output(out, [data, None, "some-hub/model-id"], is_dir=True)
    with pytest.raises(OutputError, match="is a directory; this command writes a file"):
        check_output(data, is_dir=False)
    with pytest.raises(OutputError, match="is a file; this command writes a directory"):
        check_output(tmp_path / "f", is_dir=True)
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output(tmp_path / "f" / "out", is_dir=True)
    assert check_output(tmp_path / "new" / "out", [data], is_dir=True) == tmp_path / "new" / "out"


def test_claim_refuses_what_exists_unless_reusable_or_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OutputError, match=r"out exists; pass --overwrite to replace it"):
        with claim_output(out):
            pass
    with pytest.raises(OutputError, match=r"exists \(other settings\); pass --overwrite"):
        with claim_output(out, reusable=lambda p: "other settings"):
            pass
    with claim_output(out, reusable=lambda p: None):
        pass
    with claim_output(out, overwrite=True):
        assert lock_path(out).exists()
    assert not lock_path(out).exists()


def test_digests_are_of_content():
    assert text_digest(["ab", "c"]) == text_digest(iter(["ab", "c"]))
    assert text_digest(["ab", "c"]) != text_digest(["a", "bc"]) != text_digest(["c", "ab"])
    a = [torch.tensor([1, 2]), torch.tensor([0])]
    assert tensors_digest(a) == tensors_digest([t.clone() for t in a])
    assert tensors_digest(a) != tensors_digest([torch.tensor([1]), torch.tensor([2, 0])])

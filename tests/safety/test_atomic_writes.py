"""The one all-or-nothing writer (lape_kernels.files) used by the data caches and the experiment."""
import pytest

from lape_kernels import files
from lape_kernels.data import atomic
from lape_kernels.experiment import outputs


def test_every_room_writes_through_the_one_implementation():
    assert outputs.write_atomic is files.write_atomic and outputs.publish is files.publish
    assert atomic.atomic_dir is files.atomic_dir


def test_write_atomic_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a" / "x.txt"
    files.write_atomic(path, "ü-first")
    files.write_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.txt"]


def test_write_atomic_failure_keeps_the_previous_file(tmp_path):
    path = tmp_path / "x.txt"
    files.write_atomic(path, "old")
    with pytest.raises(TypeError):
        files.write_atomic(path, 123)  # not str/bytes: nothing replaced, no temporary left
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_publish_replaces_a_directory_and_removes_the_old_one(tmp_path):
    final, new = tmp_path / "out", tmp_path / ".out.partial"
    final.mkdir(); (final / "old").write_text("1")
    new.mkdir(); (new / "new").write_text("2")
    files.publish(new, final)
    assert [p.name for p in final.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

"""load_text_dataset: any datasets input as a DatasetDict with a 'text' column."""

from __future__ import annotations

import json

import pytest

from lape_kernels.data import load_text_dataset
from lape_kernels.data.splits import split_of


def test_load_text_dataset_inputs(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_dict({"text": [f"line {i}" for i in range(50)]})
    saved = tmp_path / "saved"
    DatasetDict({"train": ds}).save_to_disk(str(saved))
    assert load_text_dataset(saved)["train"]["text"] == ds["text"]
    assert load_text_dataset(ds)["train"]["text"] == ds["text"]

    txt = tmp_path / "a.txt"
    txt.write_text("first line\nsecond line\n")
    assert load_text_dataset(txt)["train"]["text"] == ["first line", "second line"]
    val = tmp_path / "b.txt"
    val.write_text("held out\n")
    dd = load_text_dataset({"train": str(txt), "validation": str(val)})
    assert dd["validation"]["text"] == ["held out"]

    jl = tmp_path / "d" / "train.jsonl"
    jl.parent.mkdir()
    jl.write_text("\n".join(json.dumps({"content": f"doc {i}", "x": i}) for i in range(30)))
    dd = load_text_dataset(jl.parent, text_column="content", val_fraction=0.3)
    assert "text" in dd["train"].column_names and "content" not in dd["train"].column_names
    assert sorted(list(dd["train"]["text"]) + list(dd["validation"]["text"])) == sorted(f"doc {i}" for i in range(30))
    assert all(split_of(t, 0.3) == "validation" for t in dd["validation"]["text"])


def test_load_text_dataset_more_inputs(tmp_path):
    from datasets import Dataset, DatasetDict

    # a lone Dataset saved to disk is the train split
    single = tmp_path / "single"
    Dataset.from_dict({"text": ["a b", "c d"]}).save_to_disk(str(single))
    assert list(load_text_dataset(single)) == ["train"]
    assert load_text_dataset(single)["train"]["text"] == ["a b", "c d"]
    # a folder of files: splits from the file names, 'val' meaning validation
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "my_train.txt").write_text("t1\nt2\n")
    (folder / "my_val.txt").write_text("v1\n")
    (folder / "test.txt").write_text("x1\n")
    dd = load_text_dataset(folder)
    assert {k: list(v["text"]) for k, v in dd.items()} == {
        "train": ["t1", "t2"], "validation": ["v1"], "test": ["x1"]}
    # a list of files is one train split; a renamed column replaces an existing 'text'
    csv = tmp_path / "a.csv"
    csv.write_text("text,body\nold,new one\nold,new two\n")
    dd = load_text_dataset([str(csv)], text_column="body")
    assert dd["train"].column_names == ["text"] and dd["train"]["text"] == ["new one", "new two"]
    # an existing validation split is kept as is
    given = DatasetDict({"train": Dataset.from_dict({"text": ["a"]}),
                         "validation": Dataset.from_dict({"text": ["b"]})})
    assert load_text_dataset(given, val_fraction=0.5)["validation"]["text"] == ["b"]


def test_load_text_dataset_errors(tmp_path):
    from datasets import Dataset, DatasetDict

    with pytest.raises(ValueError, match="no column 'text'"):
        load_text_dataset(Dataset.from_dict({"body": ["a"]}))
    with pytest.raises(TypeError, match="spec must be"):
        load_text_dataset(42)
    bad = tmp_path / "x.docx"
    bad.write_text("?")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_text_dataset([str(bad)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a saved dataset"):
        load_text_dataset(tmp_path / "empty")
    with pytest.raises(ValueError, match="val_fraction"):
        load_text_dataset(Dataset.from_dict({"text": ["a"]}), val_fraction=1.5)
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "b.csv").write_text("text\ny\n")
    with pytest.raises(ValueError, match="mixed file types"):
        load_text_dataset([str(tmp_path / "a.txt"), str(tmp_path / "b.csv")])
    with pytest.raises(ValueError, match="no 'train' split"):
        load_text_dataset(DatasetDict({"test": Dataset.from_dict({"text": ["a"]})}), val_fraction=0.5)
    with pytest.raises(TypeError, match="spec must be"):
        load_text_dataset([])


@pytest.mark.parametrize("content, cause", [
    (b"", "empty text file (0 bytes, no text)"),
    (b"\n  \n\t\n", "empty text file (6 bytes, no text)"),
    (b"good line\n\xff\xfe bad\n", "not valid utf-8 text: byte 0xff at offset 10 (invalid start byte)"),
    (b"caf\xc3", "not valid utf-8 text: byte 0xc3 at offset 3 (unexpected end of data)"),
])
def test_unreadable_text_file_is_one_line_naming_it(tmp_path, content, cause):
    """Before: "DatasetGenerationError: An error occurred while generating the dataset"."""
    path = tmp_path / "cy.txt"
    path.write_bytes(content)
    for spec in (path, [str(path)], {"train": str(path)}, tmp_path):
        with pytest.raises(ValueError) as info:
            load_text_dataset(spec)
        assert str(info.value).startswith(f"{path}: {cause}") and "\n" not in str(info.value), info.value


def test_invalid_utf8_far_into_a_file_names_its_offset(tmp_path):
    path = tmp_path / "big.txt"
    path.write_bytes(("ł" * 700_000).encode() + b"\xc5\n")  # past the 1 MiB read chunk, mid-character
    with pytest.raises(ValueError, match=f"byte 0xc5 at offset {1_400_000}"):
        load_text_dataset(path)
    path.write_bytes(b"ok\n\xff\n")
    assert load_text_dataset(path, encoding_errors="replace")["train"]["text"] == ["ok", "\ufffd"]


def test_unreadable_json_and_csv_files_name_the_file(tmp_path):
    empty = tmp_path / "train.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=f"^{empty}: empty json file"):
        load_text_dataset(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{bad\n')
    with pytest.raises(ValueError, match=f"^{broken}: cannot read as json: ArrowInvalid: JSON parse error") as info:
        load_text_dataset(broken)
    assert "\n" not in str(info.value)
    csv = tmp_path / "c.csv"
    csv.write_text('text\n"unterminated\n')
    with pytest.raises(ValueError, match=f"^{csv}: cannot read as csv: "):
        load_text_dataset(csv)

"""stability/sources.py: every kind of source read in units, scanned and re-read alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stability import sources
from stability.data import text_corpus
from stability.sources import DataError, open_source
from tests.stability.test_data import paragraphs, write

pa = pytest.importorskip("pyarrow", reason="the test extra brings pyarrow (Parquet and Arrow sources)")
import pyarrow.ipc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def scanned(source: sources.Source) -> list[sources.Doc]:
    return [doc for _, unit in source.scan() for doc in unit]


def reread(source: sources.Source) -> list[sources.Doc]:
    """Each unit read again on its own, as a worker of lsnn prepare reads it."""
    units = [unit for unit, _ in source.scan()]
    return [doc for unit in units for doc in source.read(unit)]


def jsonl(path: Path, records: list, extra: str = "") -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records) + extra)


def test_a_single_file_read_a_block_at_a_time_is_cut_as_the_whole_text_would_be(tmp_path, monkeypatch):
    text = paragraphs(900) + "x" * 40_000 + "\n" + "line\n" * 9000  # blank lines, a long line, lines only
    path = write(tmp_path / "book.txt", text)
    monkeypatch.setattr(sources, "_READ_BLOCK", 7_001)  # cuts fall across block ends
    monkeypatch.setattr(sources.TextFile, "per_unit", 5)
    source = open_source(path)
    docs = scanned(source)
    assert [d.text for d in docs] == sources.segments(text, sources.SEGMENT_CHARS)
    assert [d.name for d in docs[:2]] == ["book.txt#00000", "book.txt#00001"] and docs[1].key == "1"
    assert reread(source) == docs


def test_a_single_file_with_multibyte_text_is_reread_by_byte_offsets(tmp_path, monkeypatch):
    text = "".join(f"Ελληνικά {i} — 日本語 🐍\n\n" for i in range(3000))
    monkeypatch.setattr(sources, "_READ_BLOCK", 4_099)  # splits multibyte characters across blocks
    source = open_source(write(tmp_path / "u.txt", text))
    docs = scanned(source)
    assert "".join(d.text for d in docs) == text
    assert reread(source) == docs


def test_a_directory_is_read_in_path_order_in_units_of_about_a_megabyte(tmp_path, monkeypatch):
    for i in range(12):
        write(tmp_path / f"d{i % 2}" / f"f{i:02d}.txt", paragraphs(2, seed=i))
    write(tmp_path / "bin.dat", b"\x00\x01")
    monkeypatch.setattr(sources, "UNIT_BYTES", 1500)
    source = open_source(tmp_path)
    units = list(source.scan())
    assert len(units) > 2 and source.skipped == 1
    docs = [d for _, unit in units for d in unit]
    assert [d.name for d in docs] == sorted(d.name for d in docs)
    assert {d.domain for d in docs} == {"d0", "d1"}
    assert reread(source) == docs


def test_json_lines_give_a_document_per_line_named_by_file_and_line(tmp_path, monkeypatch):
    records = [{"text": f"record {i} " + paragraphs(1, seed=i), "id": i} for i in range(40)]
    records[3]["text"] = "   "  # empty: skipped and counted
    records[5]["text"] = None
    path = jsonl(tmp_path / "data.jsonl", records[:20], "\n")
    path.write_text(path.read_text() + "".join(json.dumps(r) + "\n" for r in records[20:]))
    monkeypatch.setattr(sources, "UNIT_BYTES", 2000)
    source = open_source(path)
    docs = scanned(source)
    assert source.skipped == 2 and len(docs) == 38
    assert docs[0].name == "data.jsonl:1" and docs[3].name == "data.jsonl:5"  # line 4 was skipped
    assert docs[-1].name == "data.jsonl:41"  # line 21 is blank
    assert docs[-1].text == records[-1]["text"]
    assert reread(source) == docs


def test_json_lines_read_another_text_field(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [{"content": paragraphs(1, seed=i)} for i in range(30)])
    assert len(scanned(open_source(path, text_field="content"))) == 30


@pytest.mark.parametrize(("line", "needle"), [
    ("{not json", r"line 2 is not valid JSON .*fix or remove the line"),
    ('{"body": "x"}', r"line 2: no field 'text' \(fields: body\); pass --text-field"),
    ('{"text": 7}', r"line 2: field 'text' holds int, not text; pass --text-field"),
    ('["text"]', r"line 2: a JSON object per line is needed, found list"),
])
def test_a_bad_json_line_names_the_file_the_line_and_the_fix(tmp_path, line, needle):
    path = write(tmp_path / "a.jsonl", json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=needle) as err:
        scanned(open_source(path))
    assert f"--data {path}: {path}, line 2" in str(err.value)


def _table(n: int, offset: int = 0):
    texts = [f"row {offset + i}: " + paragraphs(1, seed=offset + i) for i in range(n)]
    texts[1] = None  # null and empty rows are skipped and counted
    texts[2] = ""
    return pa.table({"text": texts, "id": list(range(offset, offset + n))})


def test_parquet_row_groups_are_units_and_rows_are_named_by_index(tmp_path):
    pq.write_table(_table(30), tmp_path / "train-00000.parquet", row_group_size=8)
    pq.write_table(_table(10, 30), tmp_path / "train-00001.parquet", row_group_size=8)
    write(tmp_path / "README.md", "a dataset card")  # metadata beside the tables is not read
    source = open_source(tmp_path)
    assert source.kind == "tables"
    units = list(source.scan())
    assert len(units) == 4 + 2 and source.skipped == 4
    docs = [d for _, unit in units for d in unit]
    assert docs[0].name == "train-00000.parquet#0" and docs[1].name == "train-00000.parquet#3"
    assert docs[-1].name == "train-00001.parquet#9" and docs[-1].text.startswith("row 39:")
    assert reread(source) == docs


@pytest.mark.parametrize("layout", ["stream", "file"])
def test_arrow_files_as_datasets_writes_them_and_the_ipc_file_format(tmp_path, layout):
    table = _table(25)
    path = tmp_path / "data-00000-of-00001.arrow"
    with pa.OSFile(str(path), "wb") as sink:
        new = pa.ipc.new_stream if layout == "stream" else pa.ipc.new_file
        with new(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=10):
                writer.write_batch(batch)
    write(tmp_path / "dataset_info.json", "{}")
    write(tmp_path / "state.json", "{}")
    source = open_source(tmp_path)
    docs = scanned(source)
    assert len(list(source.scan())) == 3 and len(docs) == 23
    assert reread(source) == docs


def test_a_table_without_the_text_column_names_the_columns_and_the_flag(tmp_path):
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"no column 'text' \(columns: content\); pass --text-field"):
        scanned(open_source(tmp_path / "t.parquet"))
    assert len(scanned(open_source(tmp_path / "t.parquet", text_field="content"))) == 2


def test_auto_format_goes_by_the_files_that_hold_most_of_the_directory(tmp_path):
    for i in range(5):
        write(tmp_path / f"m{i}.py", paragraphs(20, seed=i))
    jsonl(tmp_path / "fixture.jsonl", [{"text": "small"}])  # a code tree with a small fixture
    assert open_source(tmp_path).kind == "text-directory"
    assert open_source(tmp_path, data_format="jsonl").kind == "jsonl"
    with pytest.raises(DataError, match="--data-format parquet but the directory holds no"):
        open_source(tmp_path, data_format="parquet")


def test_the_in_memory_corpus_reads_json_lines_through_the_same_source(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [{"text": paragraphs(1, seed=i)} for i in range(60)])
    corpus = text_corpus(path)
    assert corpus.train and corpus.val and len(corpus.train) + len(corpus.val) == 60
    assert {d.path for d in corpus.val} == sources.validation_keys([f"a.jsonl:{i}" for i in range(1, 61)], 0.05)

"""Embedded corpus and local-file readers, including malformed-record handling."""
import bz2
import gzip
import json
import lzma
import os
import re
import sys
import zipfile

import pytest

from dsv3.data.corpus import DOMAINS, embedded_corpus, embedded_corpus_dataset
from dsv3.data.readers import (ON_ERROR, MalformedRecordError, ReaderStats,
                               UnreadableSourceError, expand_paths, read_documents)


def test_embedded_corpus_is_real_deterministic_and_split_in_domains():
    a = list(embedded_corpus(max_docs_per_domain=5))
    b = list(embedded_corpus(max_docs_per_domain=5))
    assert [(d.id, d.text) for d in a] == [(d.id, d.text) for d in b]
    assert {d.domain for d in a} == set(DOMAINS)
    assert all(sum(d.domain == dom for d in a) == 5 for dom in DOMAINS)
    from pydoc_data.topics import topics
    ref = next(d for d in a if d.domain == "reference")
    assert ref.text == topics[ref.metadata["name"]].strip()
    code = next(d for d in a if d.domain == "code")
    assert "import" in code.text or "def " in code.text


def test_embedded_corpus_as_hf_dataset():
    ds = embedded_corpus_dataset(domains=["reference"], max_docs_per_domain=3)
    assert ds.num_rows == 3
    assert set(ds.column_names) >= {"id", "text", "domain"}
    assert set(ds["domain"]) == {"reference"}


def test_embedded_corpus_rejects_unknown_domain():
    with pytest.raises(ValueError, match=r"domains: unknown embedded domains \['poetry'\]"):
        list(embedded_corpus(domains=["poetry"]))


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_jsonl_reader_names_file_and_line_of_a_malformed_record(tmp_path):
    f = tmp_path / "data.jsonl"
    _write_jsonl(f, [json.dumps({"text": "ok one", "domain": "web"}), "{not json",
                     json.dumps({"text": "ok two"})])
    with pytest.raises(MalformedRecordError, match=r"data\.jsonl, line 2: invalid JSON"):
        list(read_documents(str(f)))


def test_jsonl_reader_skips_and_counts_when_asked(tmp_path):
    f = tmp_path / "data.jsonl"
    _write_jsonl(f, [json.dumps({"text": "ok one", "domain": "web"}), "{not json",
                     json.dumps({"body": "no text field"}), json.dumps({"text": 5}),
                     json.dumps({"text": "ok two", "lang": "en"}), '{"text": "x", oops}',
                     json.dumps({"text": ["a"]}), json.dumps({"text": None})])
    stats = ReaderStats()
    docs = list(read_documents(str(f), on_error="skip", default_domain="misc", stats=stats))
    assert [(d.text, d.domain) for d in docs] == [("ok one", "web"), ("ok two", "misc")]
    assert docs[1].metadata["lang"] == "en" and docs[1].metadata["source"].endswith("data.jsonl:5")
    s = stats.to_dict()
    assert s["read"] == 2 and s["skipped"] == 6
    # one key per kind of fault, whatever the column or type: a key per column made
    # skipped_by_reason as long as the list of bad lines
    assert s["skipped_by_reason"] == {"field 'text' is not a string": 2, "invalid JSON": 2,
                                      "missing field 'text'": 1, "field 'text' is null": 1}
    # the particulars stay in the examples (and in the error without skipping)
    assert s["skipped_examples"][0].endswith("data.jsonl:2: invalid JSON (Expecting property "
                                             "name enclosed in double quotes at column 2)")
    assert s["skipped_examples"][3].endswith("data.jsonl:6: invalid JSON (Expecting property "
                                             "name enclosed in double quotes at column 15)")
    assert s["skipped_examples"][4].endswith("data.jsonl:7: field 'text' is not a string "
                                             "(a list)")


def test_record_ids_carry_their_location_so_repeats_are_unique(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write_jsonl(a, [json.dumps(r) for r in [{"id": "7", "text": "one"}, {"id": "7", "text": "two"},
                                              {"text": "no id"}, {"id": 8, "text": "three"},
                                              {"id": None, "text": "null id"}]])
    _write_jsonl(b, [json.dumps(r) for r in [{"id": "7", "text": "four"},
                                              {"id": "8", "text": "five"}]])
    docs = list(read_documents(str(tmp_path / "*.jsonl")))
    # a null id is no id (it read "None@...")
    assert [d.id for d in docs] == [f"7@{a}:1", f"7@{a}:2", f"{a}:3", f"8@{a}:4", f"{a}:5",
                                    f"7@{b}:1", f"8@{b}:2"]
    assert docs[1].metadata["id"] == "7"  # the source's own id stays in the metadata
    again = [d.id for d in read_documents(str(tmp_path / "*.jsonl"))]
    assert again == [d.id for d in docs]  # the same ids on every read


def test_reader_remembers_nothing_per_record(tmp_path):
    """Ids come from locations, not from a set of the ids read so far: memory stays
    flat however many records stream through (a set held one entry per record)."""
    import gc
    import tracemalloc
    path = tmp_path / "many.jsonl"
    _write_jsonl(path, [json.dumps({"id": f"record-{i:06d}", "text": "x"}) for i in range(40_000)])
    docs = read_documents(str(path))
    next(docs)
    gc.collect()
    tracemalloc.start()
    for _ in range(5_000):  # warm up: buffers and caches reach their size
        next(docs)
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    n = 5_001 + sum(1 for _ in docs)
    grown = tracemalloc.get_traced_memory()[1] - before  # the peak: a set dies with the reader
    tracemalloc.stop()
    assert n == 40_000
    assert grown < 200_000, f"{grown} bytes kept over 35k records"


def test_parquet_and_text_readers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["first", None, "third"], "domain": ["a", "a", "b"]}),
                   tmp_path / "d.parquet")
    with pytest.raises(MalformedRecordError, match=r"d\.parquet, row 2: field 'text' is null"):
        list(read_documents(str(tmp_path / "d.parquet"), format="parquet"))
    docs = list(read_documents(str(tmp_path / "d.parquet"), format="parquet", on_error="skip"))
    assert [(d.text, d.domain) for d in docs] == [("first", "a"), ("third", "b")]
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    (tmp_path / "b.txt").write_text("other file")
    docs = list(read_documents(str(tmp_path / "*.txt"), format="text", default_domain="books"))
    assert [d.text.strip() for d in docs] == ["line one\nline two", "other file"]
    assert [d.id for d in docs] == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    assert {d.domain for d in docs} == {"books"}


def test_reader_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        list(read_documents("x", format="csv"))
    with pytest.raises(ValueError, match="on_error must be one of"):
        list(read_documents("x", on_error="ignore"))
    with pytest.raises(FileNotFoundError, match="paths: nothing matches"):
        list(read_documents(str(tmp_path / "missing*.jsonl")))


def test_hf_dataset_reader_through_load_dataset(tmp_path):
    """kind "hf" is datasets.load_dataset: here the parquet builder over local files
    (a hub name goes the same way where a network exists)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from dsv3.data.readers import read_hf_dataset
    pq.write_table(pa.table({"body": ["one", "two", None]}), tmp_path / "x.parquet")
    with pytest.raises(MalformedRecordError, match=r"parquet \[train\], row 3: field 'body' is null"):
        list(read_hf_dataset("parquet", data_files=str(tmp_path / "x.parquet"), text_field="body"))
    stats = ReaderStats()
    docs = list(read_hf_dataset("parquet", data_files=str(tmp_path / "x.parquet"),
                                text_field="body", default_domain="web", on_error="skip",
                                stats=stats))
    assert [(d.id, d.text, d.domain) for d in docs] == [("parquet[train]:1", "one", "web"),
                                                         ("parquet[train]:2", "two", "web")]
    assert stats.to_dict()["skipped"] == 1


def test_bad_utf8_byte_names_its_own_line_and_skipping_loses_only_that_line(tmp_path):
    """The file used to be decoded 8 KiB ahead: the error named an earlier line, and
    --skip-malformed then ended the file there (992 of 2000 good lines kept, 1 counted)."""
    f = tmp_path / "data.jsonl"
    good = [json.dumps({"text": f"good document number {i} " * 8}).encode() for i in range(2000)]
    f.write_bytes(b"\n".join(good[:1000] + [b'{"text": "bad \xff byte"}'] + good[1000:]) + b"\n")
    with pytest.raises(MalformedRecordError, match=r"data\.jsonl, line 1001: not UTF-8"):
        list(read_documents(str(f)))
    stats = ReaderStats()
    docs = list(read_documents(str(f), on_error="skip", stats=stats))
    assert len(docs) == 2000 and docs[1000].text.startswith("good document number 1000 ")
    assert docs[-1].id == f"{f}:2001"
    assert stats.to_dict()["skipped_examples"] == [f"{f}:1001: not UTF-8 (invalid start byte)"]


def test_jsonl_lines_end_at_cr_and_crlf_as_in_text_mode(tmp_path):
    """Read as bytes, lines still end where universal newlines end them, so line numbers
    (and ids) are what the text-mode reader gave."""
    f = tmp_path / "data.jsonl"
    f.write_bytes(b'{"text": "one"}\r\n{"text": "two"}\r{"text": "three"}\n\n{"text": "four"}')
    assert [d.id for d in read_documents(str(f))] == [f"{f}:{n}" for n in (1, 2, 3, 5)]


def test_a_byte_order_mark_opens_a_jsonl_file_and_loses_no_record(tmp_path):
    """Windows tools start a UTF-8 file with a BOM: its first record was an "invalid
    JSON" error, and with --skip-malformed a lost document. A BOM inside a later line
    is still that line's fault."""
    f = tmp_path / "data.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "one"}\n{"text": "two"}\n\xef\xbb\xbf{"text": "three"}\n')
    with pytest.raises(MalformedRecordError, match=r"data\.jsonl, line 3: invalid JSON"):
        list(read_documents(str(f)))
    docs = list(read_documents(str(f), on_error="skip"))
    assert [(d.id, d.text) for d in docs] == [(f"{f}:1", "one"), (f"{f}:2", "two")]


def test_missing_source_error_names_the_setting_and_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"sources[3].paths: nothing matches 'in/*.jsonl' (looked for "
            f"'{os.getcwd()}/in/*.jsonl': a relative path is taken from the working directory)")):
        expand_paths(["in/*.jsonl"], "sources[3].paths")
    with pytest.raises(ValueError, match=r"sources\[0\]\.paths: expected a glob pattern or a "
                       r"non-empty list of them, got \[\]"):
        expand_paths([], "sources[0].paths")


def test_text_file_not_utf8_names_its_line_and_skipping_loses_only_that_line(tmp_path):
    """A Latin-1 byte failed the whole run with datasets' "An error occurred while
    generating the dataset", naming neither the file nor the line, --skip-malformed
    or not."""
    f = tmp_path / "latin.txt"
    f.write_bytes(b"first line\r\nCaf\xe9 au lait\nlast line\n")
    with pytest.raises(MalformedRecordError, match=re.escape(
            f"sources[1]: {f}, line 2: not UTF-8 (invalid continuation byte)")):
        list(read_documents(str(f), format="text", source="sources[1]"))
    stats = ReaderStats()
    [doc] = read_documents(str(f), format="text", on_error="skip", stats=stats)
    assert doc.text == "first line\nlast line\n" and doc.id == str(f)
    assert doc.metadata["skipped_lines"] == 1  # the document says it is not the whole file
    assert stats.to_dict() == {"read": 1, "skipped": 1, "skipped_by_reason": {"not UTF-8": 1},
                               "skipped_examples": [f"{f}:2: not UTF-8 (invalid continuation "
                                                    f"byte)"]}


def test_clean_text_file_reads_as_datasets_read_it(tmp_path):
    """Read without datasets now: universal newlines and a kept BOM, as its text
    builder's text-mode open gave, so documents (and their ids) are unchanged."""
    f = tmp_path / "a.txt"
    f.write_bytes("\ufeffone\r\ntwo\rthree\n\nCafé".encode())
    (tmp_path / "empty.txt").write_bytes(b"")
    docs = list(read_documents(str(tmp_path / "*.txt"), format="text"))
    assert [(d.id, d.text) for d in docs] == [(str(f), "\ufeffone\ntwo\nthree\n\nCafé"),
                                              (str(tmp_path / "empty.txt"), "")]
    assert "skipped_lines" not in docs[0].metadata


def test_a_directory_in_paths_is_refused_with_the_glob_to_use(tmp_path):
    """It failed with "Unable to find '.../txt2'" (text, though it exists) or
    "[Errno 21] Is a directory" (jsonl), naming no setting."""
    (tmp_path / "txt2").mkdir()
    (tmp_path / "txt2" / "a.txt").write_text("x")
    for fmt, suffix in [("text", "*.txt"), ("jsonl", "*.jsonl"), ("parquet", "*.parquet")]:
        with pytest.raises(ValueError, match=re.escape(
                f"sources[2].paths: {str(tmp_path / 'txt2')!r} is a directory; name the files "
                f"in it with a glob such as {str(tmp_path / 'txt2' / suffix)!r}")):
            list(read_documents(str(tmp_path / "txt2"), format=fmt, source="sources[2]"))
    with pytest.raises(ValueError, match=re.escape(f"is a directory (matched by "
                                                   f"{str(tmp_path / '*')!r})")):
        expand_paths(str(tmp_path / "*"), "paths", "text")


def test_an_empty_parquet_part_file_gives_no_documents(tmp_path):
    """Spark and pandas write 0-row part files: one stopped the run ("BatchSize must be
    greater than 0"), even with on_error="skip"."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "part-0.parquet")
    pq.write_table(pa.table({"text": ["one", "two"]}), tmp_path / "part-1.parquet")
    docs = list(read_documents(str(tmp_path / "part-*.parquet"), format="parquet"))
    assert [d.text for d in docs] == ["one", "two"]


def test_corrupt_parquet_names_the_source_and_the_file(tmp_path):
    """The error was Arrow's bare "Parquet magic bytes not found", the file named only
    on a log line before it."""
    f = tmp_path / "bad.parquet"
    f.write_bytes(b"not parquet at all")
    with pytest.raises(UnreadableSourceError, match=re.escape(
            f"sources[0]: {f}: cannot be read as parquet (ArrowInvalid: Parquet magic bytes")):
        list(read_documents(str(f), format="parquet", source="sources[0]", on_error="skip"))


def test_a_domain_that_cannot_name_a_file_is_malformed_where_it_is_read(tmp_path):
    """It failed once the first such document was kept, after every step had run on
    all documents before it, with no file or line."""
    f = tmp_path / "data.jsonl"
    _write_jsonl(f, [json.dumps({"text": "ok", "domain": "docs"}),
                     json.dumps({"text": "bad", "domain": "Package Docs"}),
                     json.dumps({"text": "also bad", "domain": "a/b"})])
    with pytest.raises(MalformedRecordError, match=re.escape(
            f"{f}, line 2: field 'domain' is not a domain name ('Package Docs' cannot name "
            f"a file (use letters, digits, '_', '-', '.'))")):
        list(read_documents(str(f)))
    stats = ReaderStats()
    docs = list(read_documents(str(f), on_error="skip", stats=stats))
    assert [d.domain for d in docs] == ["docs"]
    assert stats.to_dict()["skipped_by_reason"] == {"field 'domain' is not a domain name": 2}
    with pytest.raises(ValueError, match=re.escape(
            "sources[4].default_domain: 'Package Docs' cannot name a file")):
        list(read_documents(str(f), default_domain="Package Docs", source="sources[4]"))


_COMPRESSORS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
                ".lzma": lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE)}
# a BOM, CRLF, a lone CR, Unicode line separators and no final newline: as datasets'
# text builder read them (from the plain and the compressed file alike)
_TEXT_BYTES = "\ufeffone\r\ntwo\rthree\n\nCafé \u2028 x\x85y\r\nlast, no newline".encode()
_TEXT = "\ufeffone\ntwo\nthree\n\nCafé \u2028 x\x85y\nlast, no newline"


def test_compressed_text_files_read_as_the_plain_file(tmp_path):
    """A .txt.gz was a "line 1: not UTF-8" error, and with skipping a document of the
    compressed bytes that happened to decode (training data); datasets, before,
    decompressed it."""
    plain = tmp_path / "a.txt"
    plain.write_bytes(_TEXT_BYTES)
    [want] = read_documents(str(plain), format="text")
    assert want.text == _TEXT
    for suffix, compress in _COMPRESSORS.items():
        f = tmp_path / f"a.txt{suffix}"
        # two members/streams, split inside the CRLF: one file's text all the same
        f.write_bytes(compress(_TEXT_BYTES[:6]) + compress(_TEXT_BYTES[6:])
                      if suffix != ".lzma" else compress(_TEXT_BYTES))
        for on_error in ON_ERROR:
            stats = ReaderStats()
            [doc] = read_documents(str(f), format="text", on_error=on_error, stats=stats)
            assert (doc.id, doc.text, doc.metadata) == (str(f), want.text,
                                                         {"source": str(f)}), suffix
            assert stats.to_dict()["skipped"] == 0
    # a bad byte inside is named by its line as in a plain file
    bad = tmp_path / "latin.txt.gz"
    bad.write_bytes(gzip.compress(b"first\nCaf\xe9\nlast\n"))
    with pytest.raises(MalformedRecordError, match=re.escape(f"{bad}, line 2: not UTF-8")):
        list(read_documents(str(bad), format="text"))
    [doc] = read_documents(str(bad), format="text", on_error="skip")
    assert doc.text == "first\nlast\n" and doc.metadata["skipped_lines"] == 1


def test_compressed_jsonl_files_read_as_the_plain_file(tmp_path):
    """A .jsonl.gz was never decompressed: every line "not UTF-8"."""
    plain = tmp_path / "a.jsonl"
    lines = [json.dumps({"text": f"record {i} café", "domain": "web", "n": i})
             for i in range(3000)]
    plain.write_bytes(("\r\n".join(lines) + "\n\n{broken\n").encode())
    stats = ReaderStats()
    want = [(d.text, d.domain, d.metadata["n"], d.id.rsplit(":", 1)[1])
            for d in read_documents(str(plain), on_error="skip", stats=stats)]
    assert len(want) == 3000 and stats.to_dict()["skipped"] == 1
    for suffix, compress in _COMPRESSORS.items():
        f = tmp_path / f"a.jsonl{suffix}"
        f.write_bytes(compress(plain.read_bytes()))
        got_stats = ReaderStats()
        got = [(d.text, d.domain, d.metadata["n"], d.id.rsplit(":", 1)[1])
               for d in read_documents(str(f), on_error="skip", stats=got_stats)]
        assert got == want, suffix
        assert got_stats.to_dict()["skipped_examples"] == [f"{f}:3002: invalid JSON "
                                                          f"(Expecting property name enclosed "
                                                          f"in double quotes at column 2)"]


@pytest.mark.parametrize("format", ["text", "jsonl"])
@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
def test_a_truncated_compressed_file_is_named_never_skipped(tmp_path, format, suffix):
    """A cut .gz went on as "not UTF-8" lines to skip, its prefix a document."""
    body = "".join(json.dumps({"text": f"line {i} " * 8}) + "\n" for i in range(4000))
    data = _COMPRESSORS[suffix](body.encode())
    f = tmp_path / f"cut.{'txt' if format == 'text' else 'jsonl'}{suffix}"
    f.write_bytes(data[:len(data) // 2])
    kind = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}[suffix]
    for on_error in ON_ERROR:
        stats = ReaderStats()
        with pytest.raises(UnreadableSourceError, match=re.escape(
                f"sources[3]: {f}: cannot be decompressed as {kind} (EOFError: ")):
            list(read_documents(str(f), format=format, on_error=on_error, stats=stats,
                                source="sources[3]"))
        assert stats.to_dict()["skipped"] == 0
    f.write_bytes(b"not compressed at all\n")
    with pytest.raises(UnreadableSourceError, match=re.escape(
            f"sources[3]: {f}: cannot be decompressed as {kind} (")):
        list(read_documents(str(f), format=format, on_error="skip", source="sources[3]"))


def test_zstd_needs_its_package_and_archives_or_unnamed_compression_are_refused(
        tmp_path, monkeypatch):
    """Each was a "line 1: not UTF-8" error, or with skipping garbage or nothing."""
    zst = tmp_path / "a.txt.zst"
    zst.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 8)
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as where it is not installed
    with pytest.raises(UnreadableSourceError, match=re.escape(
            f"sources[1]: {zst}: a zstd-compressed file needs the zstandard package "
            f"(pip install zstandard)")):
        list(read_documents(str(zst), format="text", on_error="skip", source="sources[1]"))
    monkeypatch.undo()
    zp = tmp_path / "a.zip"
    with zipfile.ZipFile(zp, "w") as z:
        z.writestr("a.txt", "hello")
    (tmp_path / "b.tar.gz").write_bytes(gzip.compress(b"tar"))
    (tmp_path / "c.txt").write_bytes(gzip.compress(b"unnamed gzip"))
    (tmp_path / "d.jsonl").write_bytes(zp.read_bytes())
    for name, fmt, message in [
            ("a.zip", "text", "a zip archive is not read here: extract it and name its "
                              "files in paths"),
            ("b.tar.gz", "text", "a tar archive is not read here"),
            ("c.txt", "text", "is gzip-compressed, but its name does not end in .gz: "
                              "rename it so that it is decompressed"),
            ("d.jsonl", "jsonl", "is a zip archive, not text: extract it")]:
        with pytest.raises(UnreadableSourceError, match=re.escape(
                f"sources[1]: {tmp_path / name}: {message}")):
            list(read_documents(str(tmp_path / name), format=fmt, on_error="skip",
                                source="sources[1]"))


def test_zstd_files_read_as_the_plain_file_where_zstandard_is_installed(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    c = zstandard.ZstdCompressor()
    f = tmp_path / "a.txt.zst"
    f.write_bytes(c.compress(_TEXT_BYTES[:6]) + c.compress(_TEXT_BYTES[6:]))
    [doc] = read_documents(str(f), format="text")
    assert doc.text == _TEXT
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(UnreadableSourceError, match="cannot be decompressed as zstd"):
        list(read_documents(str(f), format="text", on_error="skip"))


def test_prepare_reads_compressed_sources_as_the_plain_files(tmp_path, capsys):
    """End to end: kept documents of a .txt.gz and a .jsonl.bz2 are those of the plain
    files; a truncated one ends the run naming sources[i], --skip-malformed or not."""
    from dsv3.cli import main
    rows = "".join(json.dumps({"text": f"document {i} about ships and wool " * 5,
                               "domain": "web"}) + "\n" for i in range(6))
    story = "The harbour was quiet.\r\nShips came in with wool and grain.\r\n" * 20

    def run(name, jsonl, text):
        (tmp_path / name).mkdir()
        cfg = tmp_path / name / "cfg.toml"
        cfg.write_text(f'[[sources]]\nkind = "jsonl"\npaths = "{jsonl}"\n'
                       f'[[sources]]\nkind = "text"\npaths = "{text}"\n'
                       f'default_domain = "stories"\n'
                       f'[steps]\norder = ["exact_dedup"]\n[tokenizer]\nvocab_size = 300\n')
        out = tmp_path / name / "out"
        rc = main(["data", "prepare", "--config", str(cfg), "--out", str(out),
                   "--no-progress", "--skip-malformed"])
        if rc:
            return rc
        return {d: [(r["text"], r["domain"]) for r in map(
            json.loads, (out / "kept" / f"{d}.jsonl").read_text().splitlines())]
            for d in ("web", "stories")}

    (tmp_path / "web.jsonl").write_text(rows)
    (tmp_path / "story.txt").write_bytes(story.encode())
    (tmp_path / "web.jsonl.bz2").write_bytes(bz2.compress(rows.encode()))
    (tmp_path / "story.txt.gz").write_bytes(gzip.compress(story.encode()))
    plain = run("plain", tmp_path / "web.jsonl", tmp_path / "story.txt")
    assert len(plain["web"]) == 6 and plain["stories"] == [(story.replace("\r\n", "\n"),
                                                            "stories")]
    assert run("compressed", tmp_path / "web.jsonl.bz2", tmp_path / "story.txt.gz") == plain
    capsys.readouterr()
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes((tmp_path / "story.txt.gz").read_bytes()[:-12])
    assert run("cut", tmp_path / "web.jsonl.bz2", cut) == 2
    assert (f"error: sources[1]: {cut}: cannot be decompressed as gzip (EOFError: "
            in capsys.readouterr().err)


def test_lone_surrogate_escape_is_named_and_skippable(tmp_path):
    """JSON can spell half a UTF-16 pair ("\\ud800"); the str it gave failed far later,
    hashing the document, with no file or line named, and --skip-malformed kept it. A
    whole escaped pair (an emoji) is one character and reads."""
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "ok \\ud83d\\ude00"}\n{"text": "bad \\ud800 here"}\n{"text": "last"}\n')
    with pytest.raises(MalformedRecordError, match=re.escape(
            f"sources[0]: {f}, line 2: not UTF-8 (a lone surrogate escape (\\ud800) is not text)")):
        list(read_documents(str(f), source="sources[0]"))
    stats = ReaderStats()
    docs = list(read_documents(str(f), on_error="skip", stats=stats))
    assert [d.text for d in docs] == ["ok \U0001F600", "last"]
    assert stats.to_dict()["skipped_by_reason"] == {"not UTF-8": 1}

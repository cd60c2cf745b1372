"""The step contract and the pipeline runner: counting, side files, domain scoping."""
import json

import pytest

from dsv3.data.document import Document
from dsv3.data.pipeline import Pipeline
from dsv3.data.step import DroppedWriter, Step, StepStats


class DropShort(Step):
    name = "drop_short"

    def apply(self, doc):
        return "short" if len(doc.text) < 5 else doc


class Upper(Step):
    name = "upper"

    def apply(self, doc):
        doc.text = doc.text.upper()
        self.modified("uppercased")
        return doc


def _docs():
    return [Document(id=str(i), text=t, domain=d) for i, (t, d) in
            enumerate([("hi", "a"), ("hello world", "a"), ("yo", "b"), ("longer text", "b")])]


def test_step_counts_and_writes_dropped_with_reason(tmp_path):
    side = tmp_path / "dropped" / "drop_short.jsonl"
    step = DropShort(dropped_writer=DroppedWriter(side))
    kept = list(step(_docs()))
    step.dropped_writer.close()
    assert [d.id for d in kept] == ["1", "3"]
    assert step.stats.to_dict() == {"seen": 4, "kept": 2, "dropped": 2,
                                    "dropped_by_reason": {"short": 2}, "modified_by_reason": {},
                                    "counts": {}}
    lines = [json.loads(x) for x in side.read_text().splitlines()]
    assert [(x["step"], x["reason"], x["document"]["id"]) for x in lines] == [
        ("drop_short", "short", "0"), ("drop_short", "short", "2")]


def test_step_limited_to_domains_passes_others_through():
    step = DropShort(domains=["a"])
    kept = list(step(_docs()))
    assert [d.id for d in kept] == ["1", "2", "3"]  # "yo" is domain b: not judged
    assert step.stats.dropped == {"short": 1}


def test_pipeline_chains_and_writes_stats(tmp_path):
    pipe = Pipeline([DropShort(), Upper()])
    out = list(pipe.run(_docs(), progress=False))
    assert [d.text for d in out] == ["HELLO WORLD", "LONGER TEXT"]
    stats = pipe.write_stats(tmp_path / "stats.json", extra={"run": "x"})
    on_disk = json.loads((tmp_path / "stats.json").read_text())
    assert on_disk == stats
    assert on_disk["steps"]["drop_short"]["dropped"] == 2
    assert on_disk["steps"]["upper"]["seen"] == 2
    assert on_disk["steps"]["upper"]["modified_by_reason"] == {"uppercased": 2}


def test_stats_merge_adds_shards():
    a, b = StepStats(), StepStats()
    a.seen, a.kept = 3, 2
    a.dropped["x"] = 1
    b.seen, b.kept = 2, 1
    b.dropped["x"] = 1
    a.merge(b)
    assert a.to_dict()["dropped_by_reason"] == {"x": 2} and a.seen == 5 and a.kept == 3
    assert StepStats.from_dict(a.to_dict()).to_dict() == a.to_dict()


def test_pipeline_rejects_repeated_names():
    with pytest.raises(ValueError, match="steps: names must be unique.*drop_short"):
        Pipeline([DropShort(), DropShort()])


def test_document_validates_fields():
    with pytest.raises(TypeError, match="Document.text must be a str, got int"):
        Document(id="x", text=3)
    with pytest.raises(ValueError, match="Document.domain must be a non-empty str"):
        Document(id="x", text="t", domain="")
    d = Document(id="x", text="t", domain="d", metadata={"k": 1})
    assert Document.from_row(d.to_row()) == d
    # a metadata dict handed to two documents is not shared: a drop reason written
    # into one must not appear in the other (found by the serial/scale-out comparison)
    shared = {"source": "same record"}
    a, b = Document("a", "t", metadata=shared), Document("b", "t", metadata=shared)
    a.metadata["drop_reason"] = "x"
    assert "drop_reason" not in b.metadata and "drop_reason" not in shared

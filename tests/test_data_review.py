"""Spot-check review: seeded stratified sample, verdicts -> precision with intervals,
verdicts -> classifier labels, and the CLI round trip over prepare's output."""
import json

import pytest

from dsv3.cli import main
from dsv3.data.document import Document
from dsv3.data.pipeline import Pipeline
from dsv3.data.review import (ReviewSampler, estimate_precision, read_verdicts,
                              verdicts_to_labels, wilson)
from dsv3.data.step import Step


class DropOdd(Step):
    name = "drop_odd"

    def apply(self, doc):
        return "odd" if int(doc.id) % 2 else doc


def _docs(n=200):
    return [Document(str(i), f"text {i}", domain="a" if i % 4 < 2 else "b") for i in range(n)]


def test_sample_is_stratified_seeded_and_order_independent(tmp_path):
    def run(docs, seed):
        sampler = ReviewSampler(per_stratum=3, seed=seed)
        list(Pipeline([DropOdd()], reviewer=sampler).run(docs, progress=False))
        return sampler
    a, b = run(_docs(), 0), run(list(reversed(_docs())), 0)
    assert [i["review_id"] for i in a.items()] == [i["review_id"] for i in b.items()]
    assert [i["review_id"] for i in a.items()] != [i["review_id"] for i in run(_docs(), 1).items()]
    strata = {(i["domain"], i["decision"]) for i in a.items()}
    assert strata == {("a", "kept"), ("a", "dropped"), ("b", "kept"), ("b", "dropped")}
    assert all(sum((i["domain"], i["decision"]) == s for i in a.items()) == 3 for s in strata)
    assert a.population[("drop_odd", "a", "dropped")] == 50
    a.write(str(tmp_path))
    page = (tmp_path / "index.html").read_text()
    assert page.count('class="item"') == 12 and "download verdicts.jsonl" in page


def test_precision_estimates_and_intervals():
    lo, hi = wilson(8, 10)
    assert 0.49 < lo < 0.8 < hi < 0.95
    items = ([{"step": "s", "domain": "a", "decision": "dropped", "verdict": "correct"}] * 9
             + [{"step": "s", "domain": "a", "decision": "dropped", "verdict": "wrong"}]
             + [{"step": "s", "domain": "b", "decision": "dropped", "verdict": "correct"}] * 5
             + [{"step": "s", "domain": "b", "decision": "dropped", "verdict": "wrong"}] * 5)
    strata = [{"step": "s", "domain": "a", "decision": "dropped", "population": 900},
              {"step": "s", "domain": "b", "decision": "dropped", "population": 100}]
    r = estimate_precision(items, strata)["s"]
    # weighted by population: 0.9 * 0.9 + 0.1 * 0.5, not the pooled 14/20
    assert r["precision"] == pytest.approx(0.86)
    assert r["ci95"][0] < 0.86 < r["ci95"][1] and r["judged"] == 20
    assert r["domains"]["b"]["precision"] == 0.5
    assert "unjudged_domains" not in r


def test_a_step_judged_in_part_lists_the_domains_its_precision_leaves_out():
    """The combined precision of a step whose drops were judged in one of its domains
    read as the whole step's, with no word of the domain (and its 5,000 drops) left
    out."""
    items = [{"step": "s", "domain": "a", "decision": "dropped", "verdict": "correct"}] * 4
    strata = [{"step": "s", "domain": "a", "decision": "dropped", "population": 100},
              {"step": "s", "domain": "b", "decision": "dropped", "population": 5000},
              {"step": "s", "domain": "c", "decision": "dropped", "population": 0},
              {"step": "s", "domain": "d", "decision": "kept", "population": 70},
              {"step": "t", "domain": "e", "decision": "dropped", "population": 9}]
    r = estimate_precision(items, strata)
    assert r["s"]["precision"] == 1.0 and r["s"]["unjudged_domains"] == {"b": 5000}
    assert set(r) == {"s"}


def test_verdicts_to_labels():
    def item(rid, text, decision, verdict, step="heuristics"):
        return {"review_id": rid, "step": step, "text": text, "decision": decision,
                "verdict": verdict}
    items = [item("1", "x", "dropped", "correct"), item("2", "y", "dropped", "wrong"),
             item("3", "z", "kept", "wrong"), item("4", "w", "kept", None),
             item("5", "q", "dropped", "correct", step="quality")]
    assert [(r["text"], r["label"]) for r in verdicts_to_labels(items)] == [
        ("x", 0), ("y", 1), ("z", 0), ("q", 0)]


def test_labels_come_from_quality_decisions_only_and_each_text_once():
    """A dedup or PII drop judged correct said the dropped copy was bad text, and the
    kept copy of the same text good: train-quality learned from both."""
    good = "A well written paragraph about rivers."
    items = [{"review_id": "d", "step": "exact_dedup", "text": good, "decision": "dropped",
              "verdict": "correct"},
             {"review_id": "p", "step": "pii", "text": good, "decision": "kept",
              "verdict": "correct"},
             {"review_id": "h1", "step": "heuristics", "text": good, "decision": "kept",
              "verdict": "correct"},
             {"review_id": "q1", "step": "quality", "text": good, "decision": "kept",
              "verdict": "correct"},
             {"review_id": "h2", "step": "heuristics", "text": "spam", "decision": "kept",
              "verdict": "correct"},
             {"review_id": "q2", "step": "quality", "text": "spam", "decision": "kept",
              "verdict": "wrong"}]
    rows = verdicts_to_labels(items)
    # the good text once, from heuristics; "spam" judged both ways is left out
    assert [(r["text"], r["label"], r["review_id"]) for r in rows] == [(good, 1, "h1")]


def test_review_cli_over_prepare_output(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[output]
dir = "{tmp_path / 'out'}"
[[sources]]
kind = "embedded"
domains = ["reference", "docstrings"]
max_docs_per_domain = 12
[steps]
order = ["heuristics"]
[review]
per_stratum = 2
seed = 3
[tokenizer]
vocab_size = 300
""")
    assert main(["data", "prepare", "--config", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    sample = tmp_path / "out" / "review" / "sample.jsonl"
    items = [json.loads(x) for x in sample.read_text().splitlines()]
    dropped = [i for i in items if i["decision"] == "dropped"]
    assert dropped and len(items) <= 8
    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_text("\n".join(json.dumps({"review_id": i["review_id"], "verdict": v})
                                  for i, v in zip(dropped, ["correct", "wrong"] * 4)))
    labels = tmp_path / "labels.jsonl"
    assert main(["data", "review", "--sample", str(sample), "--verdicts", str(verdicts),
                 "--labels-out", str(labels)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["judged"] == len(dropped)
    # the stratified estimate by hand: each domain's share of the judged drops that
    # were right, weighted by how many documents the step dropped there
    right = {}
    for it, v in zip(dropped, ["correct", "wrong"] * 4):
        right.setdefault(it["domain"], []).append(v == "correct")
    strata = json.loads((sample.parent / "strata.json").read_text())["strata"]
    population = {s["domain"]: s["population"] for s in strata
                  if s["step"] == "heuristics" and s["decision"] == "dropped"
                  and s["domain"] in right}
    expected = sum(population[d] * sum(v) / len(v) for d, v in right.items()) \
        / sum(population.values())
    assert report["steps"]["heuristics"]["precision"] == pytest.approx(expected)
    assert 0.0 < expected < 1.0  # both verdicts given: a wrong sign or weight would show
    assert report["labels_written"] == len(dropped) == len(labels.read_text().splitlines())
    verdicts.write_text(json.dumps({"review_id": "nope", "verdict": "correct"}) + "\n")
    with pytest.raises(ValueError, match=r"verdicts.jsonl, line 1: review_id 'nope' is not in"):
        read_verdicts(str(sample), str(verdicts))


def test_changed_documents_are_shown_before_and_after(tmp_path):
    from dsv3.data.pii import PiiFilter
    sampler = ReviewSampler(per_stratum=10)
    docs = [Document("p", "write to a.b@example.com"), Document("q", "nothing to hide")]
    list(Pipeline([PiiFilter()], reviewer=sampler).run(docs, progress=False))
    items = {i["id"]: i for i in sampler.items()}
    assert items["p"]["text"] == "write to <EMAIL>"
    assert items["p"]["text_before"] == "write to a.b@example.com"
    assert items["q"]["text_before"] is None
    sampler.write(str(tmp_path))
    page = (tmp_path / "index.html").read_text()
    assert page.count("before this step:") == 1 and "a.b@example.com" in page


def test_documents_sharing_an_id_get_separate_review_ids_and_verdicts(tmp_path):
    # two sources that both number their records from 1, all dropped into one stratum
    docs = [Document("1", "text one"), Document("1", "text two"), Document("3", "text three")]
    sampler = ReviewSampler(per_stratum=5)
    list(Pipeline([DropOdd()], reviewer=sampler).run(docs, progress=False))
    items = [i for i in sampler.items() if i["decision"] == "dropped"]
    ids = [i["review_id"] for i in items]
    assert len(ids) == 3 and len(set(ids)) == 3 and "drop_odd/default/dropped/1#2" in ids
    sampler.write(str(tmp_path))
    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_text("".join(json.dumps({"review_id": i["review_id"], "verdict": v}) + "\n"
                                for i, v in zip(items, ["correct", "wrong", "correct"])))
    judged = read_verdicts(str(tmp_path / "sample.jsonl"), str(verdicts))
    assert sorted((i["text"], i["verdict"]) for i in judged if i["decision"] == "dropped") == \
        sorted((i["text"], v) for i, v in zip(items, ["correct", "wrong", "correct"]))
    # a sample file whose review ids repeat cannot take verdicts: an error, not a guess
    sample = tmp_path / "sample.jsonl"
    sample.write_text(sample.read_text() + sample.read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match=r"sample.jsonl, line \d+: review_id .* repeats"):
        read_verdicts(str(sample))


def _sample(tmp_path, n=3):
    """A hand-made review/ directory: n dropped decisions of one stratum."""
    review = tmp_path / "review"
    review.mkdir()
    items = [{"review_id": f"s/a/dropped/{i}", "step": "s", "domain": "a",
              "decision": "dropped", "reason": "r", "id": str(i), "text": f"t{i}",
              "text_before": None, "verdict": None} for i in range(n)]
    (review / "sample.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (review / "strata.json").write_text(json.dumps({"strata": [
        {"step": "s", "domain": "a", "decision": "dropped", "population": 10, "sampled": n}]}))
    return review / "sample.jsonl", items


def test_review_errors_name_the_file_line_and_option(tmp_path, capsys):
    sample, items = _sample(tmp_path)
    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_text(json.dumps({"review_id": items[0]["review_id"], "verdict": "correct"}))
    labels = tmp_path / "new" / "labels.jsonl"  # its directory is made
    assert main(["data", "review", "--sample", str(sample), "--verdicts", str(verdicts),
                 "--labels-out", str(labels)]) == 0
    assert json.loads(capsys.readouterr().out)["judged"] == 1 and labels.is_file()
    # json.loads of the one bad line said "Expecting value: line 1 column 1", no file
    verdicts.write_text(json.dumps({"review_id": items[0]["review_id"], "verdict": "correct"})
                        + "\n{oops\n")
    assert main(["data", "review", "--sample", str(sample), "--verdicts", str(verdicts)]) == 2
    err = capsys.readouterr().err
    assert f": error: {verdicts}, line 2: invalid JSON" in err and err.count("\n") == 1, err
    verdicts.write_text("\n" + json.dumps({"review_id": items[1]["review_id"],
                                           "verdict": "maybe"}) + "\n")
    with pytest.raises(ValueError, match=r"verdicts.jsonl, line 2: verdict must be one of"):
        read_verdicts(str(sample), str(verdicts))
    verdicts.write_text(json.dumps([items[0]["review_id"], "correct"]) + "\n")
    with pytest.raises(ValueError, match=r"verdicts.jsonl, line 1: expected a JSON object"):
        read_verdicts(str(sample), str(verdicts))
    sample.write_text(sample.read_text() + json.dumps({"id": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"sample.jsonl, line 4: missing field\(s\) "
                                         r"\['review_id'"):
        read_verdicts(str(sample))
    for argv, message in [(["--sample", "nope.jsonl"], "--sample: no such file 'nope.jsonl'"),
                          (["--sample", str(sample), "--verdicts", str(tmp_path / "no.jsonl")],
                           "--verdicts: no such file"),
                          (["--sample", str(tmp_path)], "--sample: "),
                          (["--sample", str(sample), "--labels-out", "/dev/null/x/l.jsonl"],
                           "--labels-out: cannot create /dev/null/x/l.jsonl: /dev/null is a "
                           "file, not a directory"),
                          ]:
        assert main(["data", "review", *argv]) == 2
        err = capsys.readouterr().err
        assert ": error: " + message in err and "Errno" not in err, err


def test_review_strata_file_errors_name_the_file(tmp_path, capsys):
    sample, items = _sample(tmp_path, n=2)
    strata = tmp_path / "review" / "strata.json"
    strata.write_text('{"strata": [\n  {"step": "s",\n}')
    assert main(["data", "review", "--sample", str(sample)]) == 2
    assert f"{strata}: invalid JSON" in capsys.readouterr().err
    strata.write_text('{"seed": 0}')
    assert main(["data", "review", "--sample", str(sample)]) == 2
    assert "expected an object with a 'strata' list" in capsys.readouterr().err


def test_labels_out_refuses_to_overwrite_its_own_input(tmp_path, capsys):
    """--labels-out on the sample (or the verdicts) file would replace the verdicts with
    the labels made from them: refused, and the file left as it was."""
    sample, items = _sample(tmp_path)
    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_text(json.dumps({"review_id": items[0]["review_id"], "verdict": "correct"}))
    for flag, target in (("--sample", sample), ("--verdicts", verdicts)):
        before = target.read_bytes()
        assert main(["data", "review", "--sample", str(sample), "--verdicts", str(verdicts),
                     "--labels-out", str(target)]) == 2
        err = capsys.readouterr().err
        assert f"--labels-out: {str(target)!r} is the {flag} file" in err, err
        assert target.read_bytes() == before

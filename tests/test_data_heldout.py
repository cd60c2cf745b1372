"""The held-out documents chosen by `dsv3 data prepare` (dsv3.data.heldout): never
augmented, last in each domain's tokens, related documents on one side, and the split
every training run on the data uses.

Before: the trainer split the prepared tokens itself, after augmentation had rewritten
documents, so heldout.jsonl (what `dsv3 eval` scores) held augmented text; and in the
embedded corpus a held-out module's docstrings could be in training."""
import json

import numpy as np
import pytest

from dsv3.cli import main
from dsv3.data.config import validate_config
from dsv3.data.corpus import embedded_corpus
from dsv3.data.document import Document
from dsv3.data.heldout import HeldOutChooser
from dsv3.data.tokenizer import TokenizedCorpus
from dsv3.train.checkpoint import export_heldout, saved_run
from dsv3.train.data import TrainData

# Every sentence matches an augmentation rule ("Because X, Y." -> "Y because X."), so an
# augmented document differs from its source, whatever the draw picks.
SENTENCE = "Because the tide turned {i}, the ship number {i} left the harbour at dawn."


def _rows(n=40, domains=("web", "news")):
    return [{"text": " ".join(SENTENCE.format(i=f"{d}{i}x{j}") for j in range(6)),
             "domain": d} for d in domains for i in range(n)]


def _prepare(tmp_path, rows, heldout="fraction = 0.3", steps='order = ["augment"]\n'
             '[steps.augment]\nrate = 1.0', name="out"):
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f'[output]\ndir = "{tmp_path / name}"\n[[sources]]\nkind = "jsonl"\n'
                   f'paths = "{src}"\n[steps]\n{steps}\n[heldout]\n{heldout}\n'
                   f'[tokenizer]\nvocab_size = 400\n')
    assert main(["data", "prepare", "--config", str(cfg), "--no-progress"]) == 0
    return tmp_path / name


def _kept(out, domain):
    return [json.loads(line) for line in (out / "kept" / f"{domain}.jsonl").open()]


def test_held_out_documents_are_not_augmented_and_are_what_the_trainer_holds_out(tmp_path):
    rows = _rows()
    out = _prepare(tmp_path, rows)
    sources = {r["text"] for r in rows}
    stats = json.loads((out / "stats.json").read_text())
    manifest = json.loads((out / "tokens" / "manifest.json").read_text())
    assert manifest["heldout"] == stats["heldout"]
    assert manifest["heldout"]["fraction"] == 0.3
    data = TrainData.load(out)
    assert data.val_fraction == 0.3
    for domain in ("web", "news"):
        kept = _kept(out, domain)
        held = [r for r in kept if r["metadata"].get("heldout")]
        n_held = manifest["heldout"]["documents"][domain]
        assert n_held == len(held) and 0 < n_held < len(kept)  # 40 documents at 0.3
        assert kept[-n_held:] == held  # the held-out ones last
        assert all(r["text"] in sources for r in held)  # as written: not augmented
        trained = kept[:-n_held]
        assert all(r["metadata"]["augmented"] and r["text"] not in sources for r in trained)
        # the trainer's held-out part is exactly those documents, decoded back
        export_heldout(tmp_path / f"{domain}.heldout.jsonl", {domain: data.val[domain]},
                       out / "tokenizer.json", data.train.eos_id)
        exported = [json.loads(line)["text"] for line in
                    (tmp_path / f"{domain}.heldout.jsonl").open()]
        assert exported == [r["text"] for r in held]
        assert len(data.train.offsets[domain]) - 1 == len(trained)
    # augmentation counts only the documents it may change
    assert stats["steps"]["augment"]["counts"]["heldout_documents_left_as_they_are"] == sum(
        manifest["heldout"]["documents"].values())


def test_the_choice_follows_the_text_not_the_order_or_file(tmp_path):
    """Ids name file and line: hashed, a source renamed or reordered would move
    documents between training and held-out."""
    rows = _rows(30, ("web",))
    first = _prepare(tmp_path, rows, name="first", steps='order = []')
    again = _prepare(tmp_path, rows[::-1], name="again", steps='order = []')

    def held(out):
        return {r["text"] for r in _kept(out, "web") if r["metadata"].get("heldout")}
    assert held(first) and held(first) == held(again)
    reseeded = _prepare(tmp_path, rows, "fraction = 0.3\nseed = 7", name="seeded",
                        steps='order = []')
    assert held(reseeded) != held(first)


def test_documents_of_one_group_fall_on_one_side():
    chooser = HeldOutChooser(0.5, seed=3)
    sides = set()
    for g in range(40):
        docs = [Document(f"{d}/{g}", f"text {g} of {d}", d, {"group": f"module{g}"})
                for d in ("code", "docstrings")]
        flags = {chooser.held_out(doc) for doc in docs}
        assert len(flags) == 1, g
        sides |= flags
    assert sides == {True, False}


def test_the_embedded_corpus_holds_out_a_module_with_its_docstrings():
    chooser = HeldOutChooser(0.2)
    by_module = {}
    for doc in embedded_corpus(("code", "docstrings"), max_docs_per_domain=60):
        by_module.setdefault(doc.metadata["name"], set()).add(chooser.held_out(doc))
    assert all(len(flags) == 1 for flags in by_module.values())
    assert {True, False} == set().union(*by_module.values())


def test_a_domain_held_out_whole_trains_on_its_documents(tmp_path, capsys):
    """A domain with nothing to train on would stop the trainer: it holds none out."""
    rows = _rows(12, ("web",)) + [{"text": "one small story about a lighthouse keeper.",
                                   "domain": "stories"}]
    chooser = HeldOutChooser(0.6)
    seed = next(s for s in range(100) if HeldOutChooser(0.6, s).held_out(
        Document("x", rows[-1]["text"], "stories")))
    out = _prepare(tmp_path, rows, f"fraction = {chooser.fraction}\nseed = {seed}")
    assert "every kept document of domain 'stories' (1) fell in the held-out share" in \
        capsys.readouterr().err
    manifest = json.loads((out / "tokens" / "manifest.json").read_text())
    assert manifest["heldout"]["documents"]["stories"] == 0
    assert manifest["heldout"]["documents"]["web"] > 0
    story, = _kept(out, "stories")
    assert "heldout" not in story["metadata"]
    assert not (out / "kept" / ".stories.heldout").exists()
    assert TrainData.load(out).val["stories"].numel() == 0


def test_val_fraction_follows_the_prepared_split(tmp_path):
    out = _prepare(tmp_path, _rows(20), "fraction = 0.2", steps='order = []')
    assert TrainData.load(out, 0.2).val_fraction == 0.2  # the same number: fine
    with pytest.raises(ValueError, match=r"val_fraction = 0.1: this data holds out its own "
                                         r"documents.*\[heldout\] fraction = 0.2"):
        TrainData.load(out, 0.1)
    # data from before the prepared split: the setting, by default 0.05
    legacy = TokenizedCorpus({"a": np.arange(1, 41, dtype=np.uint32) % 7},
                             {"a": np.arange(0, 41, 2)}, eos_id=0, vocab_size=8)
    assert TrainData.from_corpus(legacy).val_fraction == 0.05
    assert TrainData.from_corpus(legacy, val_fraction=0.25).val["a"].numel() == 10


def test_the_training_run_saves_the_prepared_share(tmp_path):
    out = _prepare(tmp_path, _rows(20), "fraction = 0.2", steps='order = []')
    run = tmp_path / "run"
    assert main(["train", "--data", str(out), "--out", str(run), "--set", "steps=2",
                 "--set", "micro_batch=2", "--set", "optim.warmup_steps=0", "--set",
                 'stages=[{"name": "base", "seq_len": 16}]',
                 "--no-progress"]) == 0
    saved = saved_run(run)  # the number, as a resume compares it
    assert saved["config"]["val_fraction"] == saved["data"]["val_fraction"] == 0.2
    heldout = [json.loads(line)["text"] for line in (run / "final" / "heldout.jsonl").open()]
    kept = _kept(out, "news") + _kept(out, "web")
    assert sorted(heldout) == sorted(r["text"] for r in kept if r["metadata"].get("heldout"))


@pytest.mark.parametrize("heldout, message", [
    ({"fraction": 1}, r"heldout.fraction must be in \[0, 1\), got 1"),
    ({"fraction": "0.1"}, r"heldout.fraction must be a number, got '0.1'"),
    ({"seed": -1}, r"heldout.seed must be >= 0, got -1"),
    ({"share": 0.1}, r"heldout: unknown option\(s\) \['share'\]"),
])
def test_bad_heldout_settings_are_named(heldout, message):
    with pytest.raises(ValueError, match=message):
        validate_config({"heldout": heldout})


def test_a_manifest_holding_out_a_whole_domain_is_refused(tmp_path):
    corpus = TokenizedCorpus({"a": np.array([3, 0, 4, 0], dtype=np.uint32)},
                             {"a": np.array([0, 2, 4])}, eos_id=0, vocab_size=8)
    corpus.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["heldout"] = {"fraction": 0.5, "seed": 0, "documents": {"a": 2}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"domain 'a' has 2 document\(s\), so 0 to 1 can be "
                                         r"held out, got 2"):
        TokenizedCorpus.load(tmp_path)


def test_a_loader_over_the_prepared_directory_reads_no_held_out_document(tmp_path):
    from dsv3.data.loader import PackedLoader
    out = _prepare(tmp_path, _rows(20), "fraction = 0.3", steps='order = []')
    loader = PackedLoader.from_prepared(str(out), seq_len=32, batch_size=4)
    corpus = TokenizedCorpus.load(out / "tokens")
    for domain in ("web", "news"):
        n_held = corpus.heldout["documents"][domain]
        assert n_held > 0
        assert len(loader.corpus.offsets[domain]) - 1 == len(corpus.offsets[domain]) - 1 - n_held
        cut = int(corpus.offsets[domain][-1 - n_held])
        assert len(loader.corpus.tokens[domain]) == cut


def test_a_learned_lexicon_learns_nothing_from_held_out_documents(tmp_path, monkeypatch):
    """Before: it learned from every source document, so a word only held-out documents
    have could be swapped into training text."""
    from dsv3.data import prepare
    from dsv3.data.augment import Lexicon
    rows = _rows(30, ("web",))
    (tmp_path / "src.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = validate_config({
        "sources": [{"kind": "jsonl", "paths": str(tmp_path / "src.jsonl")}],
        "steps": {"order": ["augment"], "augment": {"lexicon": "learned"}},
        "heldout": {"fraction": 0.3}})
    seen = []
    learn = Lexicon.learn.__func__
    monkeypatch.setattr(Lexicon, "learn", classmethod(
        lambda cls, texts, **kw: learn(cls, seen.extend(texts) or seen, **kw)))
    prepare._resolve_learned_lexicon(config, skip_malformed=False)
    chooser = HeldOutChooser(0.3)
    held = {r["text"] for r in rows if chooser.held_out(Document("x", r["text"], "web"))}
    assert held and seen
    assert set(seen) == {r["text"] for r in rows} - held
    assert isinstance(config["steps"]["augment"]["lexicon"], dict)  # resolved


def test_the_tokenizer_is_trained_on_no_held_out_document(tmp_path, monkeypatch):
    """Before: it was trained on every kept document, the held-out ones at the end of
    each domain's file included, so its vocabulary fitted the text eval scores."""
    from dsv3.data import prepare
    seen = []
    train = prepare.train_tokenizer
    monkeypatch.setattr(prepare, "train_tokenizer",
                        lambda texts, **kw: train(seen.extend(texts) or seen, **kw))
    out = _prepare(tmp_path, _rows(30), steps="order = []")
    kept = [row for d in ("news", "web") for row in _kept(out, d)]
    held = {row["text"] for row in kept if row["metadata"].get("heldout")}
    assert held and seen
    assert sorted(seen) == sorted(row["text"] for row in kept if row["text"] not in held)

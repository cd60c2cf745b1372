"""Scale-out: datasets.map(num_proc) and Spark give the same kept documents, stats,
side files and review sample as the plain generator chain."""
import json
import shutil
import subprocess
import sys

import pytest

from dsv3.cli import main
from dsv3.data.config import build_steps, validate_config
from dsv3.data.corpus import embedded_corpus
from dsv3.data.document import Document
from dsv3.data.pipeline import Pipeline
from dsv3.data.review import ReviewSampler
from dsv3.data.scale import run_scaled

STEPS = {"order": ["heuristics", "pii", "exact_dedup", "minhash_dedup"],
         "heuristics": {"min_words": 30, "domains": ["reference", "docstrings"]},
         "pii": {"policy": {"ip": "drop"}}}


def _docs():
    docs = list(embedded_corpus(["reference", "docstrings"], max_docs_per_domain=25))
    # PII to replace, PII to drop, an exact copy (domain "code": no heuristics)
    docs.append(Document("mail", "Contact " + docs[0].text + " a.b@example.com", "reference"))
    docs.append(Document("ip", docs[1].text + " server 10.1.20.3", "reference"))
    docs.append(Document("c1", "ADMIN = 'a.b@example.com'  # who to tell", "code"))
    docs.append(Document("c2", "ADMIN = 'a.b@example.com'  # who to tell", "code"))
    return docs


def _run(backend, tmp_path, num_proc=2):
    config = validate_config({"steps": STEPS})
    steps = build_steps(config, str(tmp_path / backend))
    reviewer = ReviewSampler(per_stratum=3, seed=1)
    pipe = Pipeline(steps, reviewer=reviewer)
    if backend == "serial":
        kept = list(pipe.run(_docs(), progress=False))
    else:
        # small shards, so that several shards and partitions are in play
        kept = list(run_scaled(_docs(), pipe.steps, config["steps"], backend, num_proc,
                               spill_dir=str(tmp_path), rows_per_shard=7))
    pipe.close()
    side = {p.name: p.read_text() for p in sorted((tmp_path / backend).iterdir())}
    assert not list(tmp_path.glob("dsv3-scale-*"))  # the spilled shards are cleaned up
    return [d.to_row() for d in kept], pipe.stats(), side, reviewer.items()


def _check_same(reference, other):
    kept, stats, side, review = other
    assert kept == reference[0]
    assert stats == reference[1]
    assert side == reference[2]
    assert review == reference[3]


def test_inline_and_datasets_match_serial(tmp_path):
    serial = _run("serial", tmp_path)
    assert serial[1]["pii"]["dropped_by_reason"] == {"pii_ip": 1}
    assert serial[1]["exact_dedup"]["dropped"] >= 1
    # the language counts travel back from the workers too (the replay merges counts)
    assert serial[1]["heuristics"]["counts"] == {"lang_en": 52}
    _check_same(serial, _run("inline", tmp_path))
    _check_same(serial, _run("datasets", tmp_path, num_proc=2))


@pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")
def test_spark_matches_serial(tmp_path):
    pytest.importorskip("pyspark", reason="pyspark is an optional dependency (the data extra)")
    if shutil.which("java") is None:
        pytest.skip("Spark needs a Java runtime")
    _check_same(_run("serial", tmp_path), _run("spark", tmp_path))


def test_bad_backend_arguments(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of"):
        list(run_scaled([], [], {}, "ray", 2))
    with pytest.raises(ValueError, match="num_proc must be >= 1, got 0"):
        list(run_scaled([], [], {}, "datasets", 0))
    with pytest.raises(ValueError, match="scale: expected backend in"):
        validate_config({"scale": {"backend": "dask"}})


def test_prepare_with_datasets_backend_writes_the_same_outputs(tmp_path, capfd):
    cfg = tmp_path / "c.toml"
    cfg.write_text("""
[[sources]]
kind = "embedded"
domains = ["reference", "docstrings"]
max_docs_per_domain = 15
[steps.heuristics]
min_words = 30
[tokenizer]
vocab_size = 300
""")
    outs = {}
    for backend in ("serial", "datasets"):
        out = tmp_path / backend
        assert main(["data", "prepare", "--config", str(cfg), "--out", str(out), "--no-progress",
                     "--backend", backend, "--num-proc", "2"]) == 0
        stats = json.loads((out / "stats.json").read_text())
        outs[backend] = (stats["steps"], stats["tokens"],
                         {p.name: p.read_text() for p in (out / "kept").iterdir()},
                         (out / "review" / "sample.jsonl").read_text())
    # --no-progress covers datasets' bars ("Generating train split", the map's) too;
    # capfd, not capsys: the map's workers are other processes
    err = capfd.readouterr().err
    assert "Generating" not in err and "per-document steps" not in err and "%|" not in err, err
    assert outs["serial"] == outs["datasets"]


def test_datasets_progress_bars_follow_progress_and_restore_the_global_switch(tmp_path, capfd):
    import datasets
    config = validate_config({"steps": STEPS})
    docs = _docs()[:10]

    def run(progress):
        steps = build_steps(config, None)
        list(run_scaled(docs, steps, config["steps"], "datasets", 2, spill_dir=str(tmp_path),
                        progress=progress))
        return capfd.readouterr().err

    assert not datasets.are_progress_bars_disabled()
    assert "per-document steps" not in run(False)
    assert not datasets.are_progress_bars_disabled()  # a library user keeps their bars
    assert "per-document steps" in run(True)  # the check above can see a bar
    datasets.disable_progress_bars()  # the user's choice stands when progress is on
    try:
        assert "per-document steps" not in run(True)
        assert datasets.are_progress_bars_disabled()
    finally:
        datasets.enable_progress_bars()


def test_quality_step_on_datasets_matches_serial(tmp_path):
    """The driver's quality model starts torch's OpenMP threads, which datasets.map's
    forked workers inherit dead: before, each worker hung in its first parallel region
    (with --num-proc 1 too). The datasets run is a subprocess, so a hang fails here
    instead of stalling the suite."""
    from dsv3.data.quality import make_featurizer, train_quality
    from test_data_quality import labeled

    train_quality(*labeled(n_good=40), make_featurizer("hashed"), str(tmp_path / "model"))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[[sources]]
kind = "embedded"
domains = ["reference", "docstrings"]
max_docs_per_domain = 15
[steps]
order = ["quality"]
[steps.quality]
model = "{tmp_path / 'model'}"
threshold = 0.3
[tokenizer]
vocab_size = 300
""")
    outs = {}
    for backend in ("serial", "datasets"):
        argv = ["data", "prepare", "--config", str(cfg), "--out", str(tmp_path / backend),
                "--no-progress", "--backend", backend, "--num-proc", "2"]
        done = subprocess.run([sys.executable, "-m", "dsv3.cli", *argv], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        stats = json.loads((tmp_path / backend / "stats.json").read_text())
        outs[backend] = (stats["steps"], stats["tokens"],
                         {p.name: p.read_text() for p in (tmp_path / backend / "kept").iterdir()})
    assert outs["serial"][0]["quality"]["seen"] > 0
    assert outs["serial"] == outs["datasets"]


def test_a_step_file_rewritten_between_runs_is_read_again(tmp_path):
    """The workers' steps were cached per process by config alone: a lexicon (or a
    quality model) rewritten at the same path kept its old contents there, on inline
    and on Spark's reused workers, where serial read the new one."""
    lexicon = tmp_path / "syn.tsv"
    steps = {"order": ["augment"], "augment": {"rate": 1.0, "lexicon": str(lexicon)}}
    doc = Document("d", "The quick fox ran home.", "web")

    def run():
        config = validate_config({"steps": steps})
        built = build_steps(config, None)
        return [d.text for d in run_scaled([doc], built, config["steps"], "inline", 1,
                                           spill_dir=str(tmp_path))]
    lexicon.write_text("quick\tfast\n")
    assert run() == ["The fast fox ran home."]
    lexicon.write_text("quick\tspeedy\n")
    assert run() == ["The speedy fox ran home."]


@pytest.mark.parametrize("backend", ["inline", "datasets"])
def test_an_input_with_no_documents_gives_none(tmp_path, backend):
    """Before: the datasets backend failed reading its empty shard ("BatchSize must be
    greater than 0"), where serial ended with "no documents were kept"."""
    config = validate_config({"steps": STEPS})
    steps = build_steps(config, None)
    assert list(run_scaled([], steps, config["steps"], backend, 1,
                           spill_dir=str(tmp_path))) == []

"""`dsv3 data prepare` end to end on a small config: outputs, stats, malformed input,
config errors, and the trainer-side loader over what it wrote."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv3.cli import main
from dsv3.data.loader import PackedLoader
from dsv3.data.prepare_lock import LOCK


def _config(tmp_path, extra=""):
    good = tmp_path / "web.jsonl"
    rows = [{"text": f"Write to person{i}@example.com about the harbour. " + " ".join(
        f"the ship number {i} carried wool and grain to the port of call {j} with care."
        for j in range(12)), "domain": "web"} for i in range(6)]
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f"""
[output]
dir = "{tmp_path / 'out'}"
[[sources]]
kind = "embedded"
domains = ["reference", "docstrings"]
max_docs_per_domain = 8
[[sources]]
kind = "jsonl"
paths = ["{good}"]
[steps.heuristics]
domains = ["reference"]
min_words = 30
[steps.minhash_dedup]
threshold = 0.7
[tokenizer]
vocab_size = 400
{extra}
""")
    return cfg


def test_malformed_line_stops_with_file_and_line_then_skips_by_flag(tmp_path, capsys):
    cfg = _config(tmp_path)
    assert main(["data", "prepare", "--config", str(cfg), "--no-progress"]) == 2
    assert "web.jsonl, line 7: invalid JSON" in capsys.readouterr().err
    assert main(["data", "prepare", "--config", str(cfg), "--no-progress",
                 "--skip-malformed"]) == 0
    printed = capsys.readouterr()
    # the skip is said, not only counted in stats.json
    assert json.loads(printed.out)["skipped_records"] == {"sources[1]": {"invalid JSON": 1}}
    assert "warning: skipped 1 malformed record(s) (sources[1]: 1 invalid JSON)" in printed.err
    out = tmp_path / "out"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["readers"][0]["skipped"] == 1 and stats["readers"][0]["read"] == 6
    steps = stats["steps"]
    assert list(steps) == ["heuristics", "pii", "exact_dedup", "minhash_dedup"]
    # which rules judged the documents (heuristics is limited to "reference")
    assert steps["heuristics"]["counts"] == {"lang_en": 8}
    assert steps["heuristics"]["seen"] == 16 + 6
    assert steps["pii"]["modified_by_reason"]["found_email"] >= 6
    # the six web documents differ only in a number: near-duplicates of the first
    assert steps["minhash_dedup"]["dropped_by_reason"] == {"near_duplicate": 5}
    for name, s in steps.items():
        dropped = (out / "dropped" / f"{name}.jsonl").read_text().splitlines()
        assert len(dropped) == s["dropped"], name
    web = [json.loads(x) for x in (out / "kept" / "web.jsonl").read_text().splitlines()]
    assert len(web) == 1 and "<EMAIL>" in web[0]["text"] and "@example.com" not in web[0]["text"]
    assert set(stats["tokens"]["domains"]) == {"reference", "docstrings", "web"}
    assert sum(stats["mixture"]["weights"].values()) == pytest.approx(1.0)


def test_loader_over_prepared_output_follows_configured_mixture(tmp_path):
    cfg = _config(tmp_path, extra="""
[mixture]
total_tokens = 100000
max_chunk_tokens = 128
[mixture.weights]
reference = [0.6, 0.2]
docstrings = [0.3, 0.5]
web = [0.1, 0.3]
""")
    assert main(["data", "prepare", "--config", str(cfg), "--no-progress",
                 "--skip-malformed"]) == 0
    loader = PackedLoader.from_prepared(str(tmp_path / "out"), seq_len=63, batch_size=8)
    assert loader.vocab_size == 400 and loader.eos_id == 0  # the BPE's one special token
    counts = torch.zeros(3)
    for i, batch in enumerate(loader):
        assert batch["input_ids"].shape == (8, 64)
        assert int(batch["input_ids"].max()) < 400
        counts += torch.bincount(batch["domain_ids"].flatten(), minlength=3)
        if i == 39:
            break
    n = int(counts.sum())  # 20480 tokens: progress 0 -> 0.2, reference 0.6 -> 0.52
    expected = torch.tensor(loader.schedule.mean_weights(0, n), dtype=torch.float32)
    # the deficit sampler stays within about a document per domain of its target (a
    # document's chunks follow one another)
    longest = max(int(np.diff(offsets).max()) for offsets in loader.corpus.offsets.values())
    assert torch.allclose(counts / n, expected, atol=(longest + 2 * 128) / n), (counts / n,
                                                                                expected)


def test_config_errors_name_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[steps]\norder = ["heuristics", "spellcheck"]\n')
    assert main(["data", "prepare", "--config", str(bad)]) == 2
    assert "steps.order: unknown step 'spellcheck'" in capsys.readouterr().err
    bad.write_text('[steps.heuristics]\nmin_wrods = 3\n')
    assert main(["data", "prepare", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "heuristics: unknown rule(s) ['min_wrods']" in capsys.readouterr().err
    assert main(["data", "prepare", "--config", str(tmp_path / "none.toml")]) == 2
    assert "--config: no such file" in capsys.readouterr().err
    # a bare "[Errno 20] Not a directory: '/dev/null/x'" named no option
    assert main(["data", "prepare", "--config", "demo", "--out", "/dev/null/x"]) == 2
    assert "error: --out: cannot create /dev/null/x: /dev/null is a file" in \
        capsys.readouterr().err


@pytest.mark.parametrize("name", ["demo", "deepseek_v3_recipe"])
def test_shipped_configs_validate(name):
    from dsv3.data.config import build_steps, builtin_configs, load_config
    from dsv3.data.mixture import MixtureSchedule
    assert name in builtin_configs()
    config = load_config(name)
    build_steps(config, dropped_dir=None)
    mix = config["mixture"]
    schedule = MixtureSchedule(mix["weights"], mix["total_tokens"])
    if name == "deepseek_v3_recipe":
        assert len(schedule.domains) == 12
        tech = schedule.domains.index("tech")
        assert schedule.weights_at(0.0)[tech] == pytest.approx(0.25)
        assert schedule.weights_at(1.0)[tech] == pytest.approx(0.18)


def test_cli_lists_command_groups(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "data" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["data"])  # a group without its subcommand is a usage error
    assert "SUBCOMMAND" in capsys.readouterr().err


def test_rerun_with_fewer_domains_and_steps_leaves_only_its_own_outputs(tmp_path, capsys):
    """A second run into the same --out used to leave the first run's kept/ and tokens/
    files of a domain it no longer has (encoded with the old tokenizer) and the side
    file of a step it no longer runs."""
    def run(domains, order):
        cfg = tmp_path / "c.toml"
        cfg.write_text(f"""
[[sources]]
kind = "embedded"
domains = {json.dumps(domains)}
max_docs_per_domain = 4
[steps]
order = {json.dumps(order)}
[tokenizer]
vocab_size = 300
""")
        assert main(["data", "prepare", "--config", str(cfg), "--out", str(out),
                     "--no-progress"]) == 0
        capsys.readouterr()

    out = tmp_path / "out"
    run(["reference", "docstrings"], ["pii", "exact_dedup"])
    assert (out / "kept" / "docstrings.jsonl").is_file()
    assert (out / "dropped" / "pii.jsonl").is_file()
    mine = [out / "NOTES.md", out / "kept" / "notes.txt", out / "tokens" / "extra.bin",
            out / "dropped" / "by hand.jsonl"]
    for path in mine:
        path.write_text("not prepare's")
    run(["reference"], ["exact_dedup"])
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted(["dropped/exact_dedup.jsonl", "kept/reference.jsonl",
                            "mixture.json", "review/index.html", "review/sample.jsonl",
                            "review/strata.json", "stats.json", "tokenizer.json",
                            "tokens/manifest.json", "tokens/reference.offsets.npy",
                            "tokens/reference.tokens.npy", LOCK]
                           + [str(p.relative_to(out)) for p in mine]), files


def test_rerun_removes_only_what_the_last_run_listed_never_a_source(tmp_path, capsys):
    """Stale outputs are the files the previous run's stats.json lists, not whatever
    matches their names: a user's input that sits in kept/ and looks like a domain's
    output (here the source of the run itself) survives every re-run."""
    out = tmp_path / "out"
    source = out / "kept" / "raw_2023.jsonl"
    source.parent.mkdir(parents=True)
    source.write_text("".join(json.dumps({"text": f"Document {i} about the topic at hand, "
                                                  f"long enough to keep. " * 3, "id": str(i)})
                              + "\n" for i in range(12)))
    other = out / "tokens" / "old.tokens.npy"  # named like an output; no run wrote it
    other.parent.mkdir()
    other.write_text("mine")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[[sources]]
kind = "jsonl"
paths = ["{source}"]
default_domain = "web"
[steps]
order = []
[tokenizer]
vocab_size = 300
""")
    for _ in range(2):
        assert main(["data", "prepare", "--config", str(cfg), "--out", str(out),
                     "--no-progress"]) == 0, capsys.readouterr().err
    assert source.is_file() and other.read_text() == "mine"
    stats = json.loads((out / "stats.json").read_text())
    assert "kept/web.jsonl" in stats["outputs"] and (out / "kept" / "web.jsonl").is_file()


def test_prepare_option_errors_name_the_option(tmp_path, capsys):
    cfg = _config(tmp_path)
    for args, message in [(["--num-proc", "0"], "--num-proc must be >= 1, got 0"),
                          (["--backend", "datasets", "--num-proc", "-2"],
                           "--num-proc must be >= 1, got -2"),
                          (["--out", str(cfg)], "--out: "),
                          ]:
        assert main(["data", "prepare", "--config", str(cfg), "--no-progress", *args]) == 2
        err = capsys.readouterr().err
        assert ": error: " + message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # checked before any work


@pytest.mark.parametrize("config, message", [
    ({"output": {"dri": "x"}}, "output: unknown option(s) ['dri']"),
    ({"sources": {"kind": "jsonl"}}, "sources: expected a list of tables ([[sources]])"),
    ({"sources": [{"kind": "jsonl"}]}, "sources[0]: 'paths' is required for kind 'jsonl'"),
    ({"sources": [{"kind": "jsonl", "path": "x"}]}, "sources[0]: unknown option(s) ['path']"),
    ({"review": {"per_stratum": 0}}, "review.per_stratum must be >= 1, got 0"),
    ({"tokenizer": {"min_frequency": -1}}, "tokenizer.min_frequency must be >= 0, got -1"),
    ({"tokenizer": {"vocab_size": 8192.0}}, "tokenizer.vocab_size must be a whole number"),
    ({"mixture": {"seed": -1}}, "mixture.seed must be >= 0, got -1"),
    ({"mixture": {"max_chunk_tokens": 0}}, "mixture.max_chunk_tokens must be >= 1, got 0"),
    ({"mixture": {"weights": {"web": "lots"}}}, "mixture.weights['web']: expected a number"),
    # found when the first document was kept, after every step had run on the others
    ({"sources": [{"kind": "jsonl", "paths": "x", "default_domain": "Package Docs"}]},
     "sources[0].default_domain: 'Package Docs' cannot name a file (use letters, digits"),
    # these failed mid-run: "'<' not supported between instances of 'str' and 'int'"
    ({"scale": {"backend": "datasets", "num_proc": "2"}}, "scale.num_proc must be a whole"),
    ({"scale": {"backend": "datasets", "num_proc": 0}}, "scale.num_proc must be >= 1, got 0"),
    ({"sources": [{"kind": "embedded", "max_docs_per_domain": "5"}]},
     "sources[0].max_docs_per_domain must be a whole number, got '5'"),
])
def test_config_sections_are_checked_before_any_work(config, message):
    """Each of these used to pass validate_config and fail (or not) at the end of a run."""
    from dsv3.data.config import validate_config
    with pytest.raises(ValueError) as error:
        validate_config(config)
    assert message in str(error.value)


def test_errors_name_the_subcommand(tmp_path, capsys):
    for args, prefix in [(["prepare", "--config", str(tmp_path / "none.toml")],
                          "dsv3 data prepare: error: --config: no such file"),
                         (["train-quality", "--data", str(tmp_path / "none.jsonl"), "--out",
                           str(tmp_path / "q")], "dsv3 data train-quality: error: --data: "),
                         (["review", "--sample", str(tmp_path / "none.jsonl")],
                          "dsv3 data review: error: --sample: ")]:
        assert main(["data", *args]) == 2
        assert capsys.readouterr().err.startswith(prefix)


def test_every_data_option_says_what_it_is_for():
    import argparse

    from dsv3.cli import build_parser

    def subcommands(parser):
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return action.choices

    for name, parser in subcommands(subcommands(build_parser())["data"]).items():
        silent = [a.option_strings[0] for a in parser._actions if not a.help]
        assert not silent, (name, silent)


def _small_config(tmp_path, sources, extra=""):
    """A fast run: a jsonl source of six distinct documents (domain "web"), then
    ``sources`` (TOML [[sources]] tables), exact dedup only."""
    web = tmp_path / "web.jsonl"
    web.write_text("".join(json.dumps({"text": f"document {i} about ships and wool " * 5,
                                       "domain": "web"}) + "\n" for i in range(6)))
    cfg = tmp_path / "small.toml"
    cfg.write_text(f'[[sources]]\nkind = "jsonl"\npaths = "{web}"\n{sources}\n'
                   f'[steps]\norder = ["exact_dedup"]\n[tokenizer]\nvocab_size = 300\n{extra}')
    return cfg


def _run(cfg, out, *args):
    return main(["data", "prepare", "--config", str(cfg), "--out", str(out), "--no-progress",
                 *args])


def test_a_text_source_that_is_not_utf8_is_named_then_its_line_skipped(tmp_path, capsys):
    """A Latin-1 .txt ended the run with datasets' DatasetGenerationError ("An error
    occurred while generating the dataset"), with --skip-malformed too."""
    txt = tmp_path / "latin.txt"
    txt.write_bytes(b"Caf\xe9 menu\nthe soup of the day\n")
    cfg = _small_config(tmp_path, f'[[sources]]\nkind = "text"\npaths = "{txt}"\n'
                        f'default_domain = "menus"')
    assert _run(cfg, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"error: sources[1]: {txt}, line 1: not UTF-8 (invalid continuation byte)" in err, err
    assert _run(cfg, tmp_path / "out", "--skip-malformed") == 0, capsys.readouterr().err
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["readers"][1]["skipped_by_reason"] == {"not UTF-8": 1}
    [menu] = [json.loads(x) for x in (tmp_path / "out" / "kept" / "menus.jsonl").open()]
    assert menu["text"] == "the soup of the day\n" and menu["metadata"]["skipped_lines"] == 1


@pytest.mark.parametrize("kind, make, message", [
    ("parquet", lambda d: (d / "bad.parquet").write_bytes(b"PAR1 truncated"),
     "sources[1]: {d}/bad.parquet: cannot be read as parquet (ArrowInvalid: "),
    ("text", lambda d: (d / "txt2").mkdir(),
     "sources[1].paths: '{d}/txt2' is a directory; name the files in it with a glob such as "
     "'{d}/txt2/*.txt'"),
])
def test_unreadable_source_files_name_the_source(tmp_path, capsys, kind, make, message):
    """A corrupt parquet file ended with Arrow's bare message (the file only on an
    earlier log line); a directory with "Unable to find" though it exists."""
    make(tmp_path)
    name = "bad.parquet" if kind == "parquet" else "txt2"
    cfg = _small_config(tmp_path, f'[[sources]]\nkind = "{kind}"\npaths = "{tmp_path / name}"')
    assert _run(cfg, tmp_path / "out", "--skip-malformed") == 2
    err = capsys.readouterr().err
    assert "error: " + message.format(d=tmp_path) in err, err
    assert not (tmp_path / "out").exists()


def test_a_record_domain_that_cannot_name_a_file_is_named_where_it_is_read(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "pip install " * 20, "domain": "Package Docs"}) + "\n")
    cfg = _small_config(tmp_path, f'[[sources]]\nkind = "jsonl"\npaths = "{docs}"')
    assert _run(cfg, tmp_path / "out") == 2
    err = capsys.readouterr().err
    # was "document '...:1': domain 'Package Docs' cannot name a file", once kept
    assert (f"error: sources[1]: {docs}, line 1: field 'domain' is not a domain name "
            f"('Package Docs' cannot name a file") in err, err
    assert _run(cfg, tmp_path / "out", "--skip-malformed") == 0, capsys.readouterr().err
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["readers"][1]["skipped_by_reason"] == {"field 'domain' is not a domain name": 1}


@pytest.mark.parametrize("weights, message", [
    ("web = 0.5\nwbe = 0.5", "mixture.weights: domains ['wbe'] have no kept documents: no "
     "source has any (the sources' domains: ['short', 'web'])"),
    ("web = 0.5\nshort = 0.5", "mixture.weights: domains ['short'] have no kept documents "
     "(kept: ['web'])"),
])
def test_a_mixture_domain_without_documents_fails_before_the_tokenizer(tmp_path, capsys,
                                                                       monkeypatch, weights,
                                                                       message):
    """A typo in [mixture.weights] was reported after every step and the tokenizer's
    training had run."""
    import dsv3.data.prepare as prepare_module

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("the tokenizer was trained before the mixture was checked")
    monkeypatch.setattr(prepare_module, "train_tokenizer", no_tokenizer)
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "too short", "domain": "short"}) + "\n")
    cfg = _small_config(tmp_path, f'[[sources]]\nkind = "jsonl"\npaths = "{short}"',
                        f'[steps.heuristics]\ndomains = ["short"]\n[mixture.weights]\n{weights}')
    cfg.write_text(cfg.read_text().replace('order = ["exact_dedup"]',
                                           'order = ["heuristics", "exact_dedup"]'))
    assert _run(cfg, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "error: " + message in err, err


def test_sigterm_is_taken_as_ctrl_c_is_and_exits_143(tmp_path):
    """A scheduler's SIGTERM killed the run outright: no word, its stage and lock left
    for the next run to clear. In a process of its own: a SIGTERM that no handler took
    would end pytest."""
    import subprocess
    import sys
    out = tmp_path / "out"
    out.mkdir()
    script = (
        "import os, signal, time, sys\n"
        "import dsv3.data.prepare as prepare_module\n"
        "from dsv3.cli import main\n"
        "def terminated(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "prepare_module.train_tokenizer = terminated\n"
        f"sys.exit(main(['data', 'prepare', '--config', {str(_small_config(tmp_path, ''))!r}, "
        f"'--out', {str(out)!r}, '--no-progress']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert (done.returncode, done.stderr) == (143, f"dsv3 data prepare: terminated (SIGTERM); "
                                                   f"{str(out)!r} is as it was before this "
                                                   f"run\n"), done.stderr
    assert sorted(p.name for p in out.iterdir()) == [LOCK]  # the stage is gone


def test_prepare_runs_from_a_thread_other_than_the_main_one(tmp_path):
    """Only the main thread may set signal handlers: the SIGTERM handler made
    `dsv3.cli.main(["data", "prepare", ...])` from a worker thread fail at once."""
    import threading
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        rc=_run(_small_config(tmp_path, ""), tmp_path / "out")))
    thread.start()
    thread.join(300)
    assert result == {"rc": 0} and (tmp_path / "out" / "stats.json").is_file()


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, capsys, monkeypatch):
    """It printed a raw traceback (the stage was removed all the same)."""
    import dsv3.data.prepare as prepare_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare_module, "train_tokenizer", interrupted)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    try:
        rc = _run(_small_config(tmp_path, ""), out)
    except KeyboardInterrupt:  # not pytest's: it would end the whole session
        pytest.fail("KeyboardInterrupt escaped dsv3 data prepare")
    assert rc == 130
    assert capsys.readouterr().err == (f"dsv3 data prepare: interrupted; {str(out)!r} is as it "
                                       f"was before this run\n")
    assert sorted(p.name for p in out.iterdir()) == [LOCK, "mine.txt"]


@pytest.mark.parametrize("args, given", [(["--backend", "serial", "--num-proc", "4"],
                                          "--backend serial"),
                                         (["--num-proc", "4"], "[scale] backend = 'serial'")])
def test_num_proc_with_the_serial_backend_is_named_as_ignored(tmp_path, capsys, args, given):
    """It was ignored without a word: four processes asked for, one used."""
    assert _run(_small_config(tmp_path, ""), tmp_path / "out", *args) == 0
    assert capsys.readouterr().err == (
        f"dsv3 data prepare: warning: --num-proc 4 is ignored: {given} runs in one process "
        f"(--backend datasets or --backend spark would use 4)\n")


@pytest.mark.parametrize("steps, message", [
    # a string was taken letter by letter: the step judged no document, silently
    ({"heuristics": {"domains": "reference"}},
     "steps.heuristics: domains must be a list of domain names, got 'reference'"),
    ({"heuristics": {"write_dropped": "no"}},  # "no" is true: the side file was written
     "steps.heuristics.write_dropped must be true or false, got 'no'"),
    # these ran until the first document and failed with Python's words, no setting
    ({"minhash_dedup": {"ngram": 2.5}}, "steps.minhash_dedup: ngram must be a whole number"),
    ({"minhash_dedup": {"threshold": 1.5}}, "steps.minhash_dedup: threshold must be in (0, 1)"),
    ({"pii": {"policy": {"email": "dropp"}}}, "steps.pii: policy['email']: unknown action"),
    ({"augment": {"lexicon": "no-such-synonyms.tsv"}},
     "steps.augment: [Errno 2] No such file or directory: 'no-such-synonyms.tsv'"),
])
def test_step_options_are_checked_and_named_before_any_work(steps, message):
    from dsv3.data.config import build_steps, validate_config
    config = validate_config({"steps": {"order": list(steps), **steps}})
    with pytest.raises(ValueError) as error:
        build_steps(config, dropped_dir=None)
    assert str(error.value).startswith(message), error.value


def test_a_file_two_sources_read_is_refused_and_one_source_reads_it_once(tmp_path, capsys):
    """Overlapping patterns read a file twice, its documents doubled under the same ids."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"text": f"Document number {i} is here "
                                                             f"with some words.", "domain": "web"})
                                         + "\n" for i in range(20)))
    cfg = tmp_path / "c.toml"
    body = f"""[output]
dir = "{tmp_path / 'out'}"
[steps]
order = []
[tokenizer]
vocab_size = 300
"""
    cfg.write_text(body + f"""[[sources]]
kind = "jsonl"
paths = ["{src / 'a.jsonl'}", "{src / '*.jsonl'}"]
""")
    with pytest.warns(UserWarning, match=r"sources\[0\]\.paths: .*a\.jsonl.* is already read"):
        assert main(["data", "prepare", "--config", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["kept_by_domain"] == \
        {"web": 20}
    cfg.write_text(body + f"""[[sources]]
kind = "jsonl"
paths = "{src / 'a.jsonl'}"
[[sources]]
kind = "jsonl"
paths = "{src / '*.jsonl'}"
""")
    assert main(["data", "prepare", "--config", str(cfg), "--no-progress"]) == 2
    assert f"sources[1].paths: {str(src / 'a.jsonl')!r} is also read by sources[0]" in \
        capsys.readouterr().err

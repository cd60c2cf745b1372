"""``dsv3 data prepare``: sources -> steps -> kept documents -> tokenizer -> tokens -> mixture.

Everything streams except what must see the whole corpus (dedup's index, tokenizer
training); the datasets and Spark backends spill the input to parquet shards first
(dsv3.data.scale). Outputs, all under ``[output] dir``:

    stats.json            per-step kept/dropped/modified counts with reasons, reader
                          counts (malformed records skipped), tokens per domain
    dropped/<step>.jsonl  every dropped document with its step and reason
    kept/<domain>.jsonl   the documents that made it through, the held-out ones last
                          (flagged "heldout": never augmented, see dsv3.data.heldout)
    tokenizer.json        the byte-level BPE trained on the kept documents
    tokens/               per-domain token arrays + offsets (TokenizedCorpus), and in
                          its manifest how many of each domain's last are held out
    mixture.json          the schedule the trainer's loader will follow
    review/               the spot-check sample: sample.jsonl, strata.json, index.html

A run writes into a staging directory inside ``dir`` (``.partial-*``: on the same file
system even where ``dir`` is a mount point or a link to another disk, and hidden from
the glob patterns of sources) and moves its files in once all are written, so a run
that fails (a malformed record, a mixture domain with no kept documents) leaves the
output directory as it was (but for the stage of a run that kept nothing, left there
for a look at why); written in place, a failed re-run had already emptied
the previous run's side files and rewritten its kept/. The cost: disk room for a
second copy of the outputs while a run lasts. Every source pattern is matched, and
the config checked, before any work starts.

The move itself is one rename per file, and an interruption (Ctrl-C, a kill, a power
cut) in its middle would leave a tokenizer of one run next to tokens of another. So
it rolls forward (dsv3.data.movein): a journal written before the first rename names
what is moved; while it is there the stage holds the files not yet moved and is kept
(on Ctrl-C too), readers of the directory (the trainer) refuse it, and the next
``dsv3 data prepare`` into it, once its own config checks pass, finishes the move
first (saying so on stderr), then runs as usual. That finish completes the run that
was interrupted: a new run that then fails leaves that one's outputs in place. The
stage of a run killed before its move (no stats.json in it yet) is removed by the
next run, which says so. Runs into one directory take turns: one started while
another is still writing there stops at once (dsv3.data.prepare_lock).

A re-run into the same directory replaces these: a run that ends well removes the
``kept/``, ``tokens/`` and ``dropped/`` files that the previous run listed as its
outputs in stats.json and this run did not write (a domain or step it no longer
has), so the directory holds one run. No other file is touched, nor any source (of
the run, or of an interrupted one whose move it finishes): a run whose output would
replace one of its own source files stops before moving anything in.
"""
from __future__ import annotations

import contextlib
import glob
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any, Iterator

from tqdm.auto import tqdm

from dsv3.data.augment import Augmenter, Lexicon
from dsv3.data.config import build_steps, validate_config
from dsv3.data.corpus import DOMAINS, embedded_corpus
from dsv3.data.document import Document
from dsv3.data.heldout import HELDOUT_KEY, HeldOutChooser, is_held_out
from dsv3.data.mixture import MixtureSchedule
from dsv3.data.movein import finish_interrupted, journal_path, move_in
from dsv3.data.pipeline import Pipeline
from dsv3.data.prepare_lock import LOCK, exclusive_run, lock_path
from dsv3.data.readers import (DOMAIN_NAME_RE, DOMAIN_NAME_RULE, ReaderStats, expand_paths,
                               read_documents, read_hf_dataset)
from dsv3.data.review import ReviewSampler
from dsv3.data.scale import datasets_progress, run_scaled
from dsv3.data.tokenizer import TokenizedCorpus, train_tokenizer


def read_sources(config: dict, skip_malformed: bool, stats: list[dict]) -> Iterator[Document]:
    """Documents of every configured source (checked by validate_config) in order;
    reader counts go to ``stats``."""
    for i, src in enumerate(config["sources"]):
        src = dict(src)
        kind = src.pop("kind")
        if kind == "embedded":
            yield from embedded_corpus(src.get("domains", DOMAINS), src.get("max_docs_per_domain"))
            continue
        if skip_malformed:
            src["on_error"] = "skip"
        reader_stats = ReaderStats()
        label = f"sources[{i}]"  # errors name the source, not only its file
        if kind == "hf":
            yield from read_hf_dataset(src.pop("name"), stats=reader_stats, source=label, **src)
        else:
            yield from read_documents(src.pop("paths"), format=kind, stats=reader_stats,
                                      source=label, **src)
        stats.append({"source": i, "kind": kind, **reader_stats.to_dict()})


def _check_source_paths(config: dict) -> None:
    """Every local source matches files, before anything is read or written."""
    read_by: dict[str, int] = {}  # real path -> the source that reads it
    for i, src in enumerate(config["sources"]):
        if "paths" not in src:
            continue
        with warnings.catch_warnings():  # the reading itself warns of overlaps, once
            warnings.simplefilter("ignore")
            paths = expand_paths(src["paths"], f"sources[{i}].paths", src["kind"])
        for path in paths:
            first = read_by.setdefault(os.path.realpath(path), i)
            if first != i:  # mixture weights, not a second reading, weight a domain up
                raise ValueError(f"sources[{i}].paths: {path!r} is also read by "
                                 f"sources[{first}]; its documents would count twice")


def _missing_mixture_domains(config: dict, domains, why: str) -> None:
    """A ``[mixture.weights]`` domain not among ``domains`` is an error; ``why`` ends
    the message, naming the domains there are. The config cannot know the documents'
    own domains, so this runs as soon as they are known, not after the tokenizer is
    trained."""
    weights = config["mixture"].get("weights") or {}
    missing = sorted(d for d in weights if d not in domains)
    if missing:
        raise ValueError(f"mixture.weights: domains {missing} have no kept documents"
                         f"{why.format(sorted(domains))}")


def _check_mixture_after_reading(docs: Iterator[Document], config: dict
                                 ) -> Iterator[Document]:
    """``docs`` unchanged; once the last one is read, a weight for a domain that no
    source had fails the run. With the datasets and Spark backends that is before any
    step runs (the input is spilled first); streaming, the steps run alongside."""
    seen: set[str] = set()
    for doc in docs:
        seen.add(doc.domain)
        yield doc
    _missing_mixture_domains(config, seen, ": no source has any (the sources' domains: {})")


def _write_kept(docs: Iterator[Document], kept_dir: str
                ) -> tuple[dict[str, int], dict[str, int]]:
    """Each domain's kept documents to ``kept/<domain>.jsonl``, the held-out ones
    (dsv3.data.heldout) last; returns the documents per domain and the held-out ones
    among them. A domain whose every document was held out trains on them all: its
    documents keep their place and lose the flag (they were not augmented either)."""
    os.makedirs(kept_dir, exist_ok=True)
    files: dict[tuple[str, bool], Any] = {}
    counts: dict[str, int] = {}
    held: dict[str, int] = {}

    def path(domain: str, held_out: bool) -> str:
        # the held-out ones wait in a hidden file until every document is written
        return os.path.join(kept_dir, f".{domain}.heldout" if held_out else f"{domain}.jsonl")

    try:
        for doc in docs:
            # the readers and the config check domains as they come in; this is the
            # last guard for documents that came another way
            if not DOMAIN_NAME_RE.match(doc.domain):
                raise ValueError(f"document {doc.id!r}: domain {doc.domain!r} cannot name a "
                                 f"file ({DOMAIN_NAME_RULE})")
            key = (doc.domain, is_held_out(doc))
            f = files.get(key)
            if f is None:
                f = files[key] = open(path(*key), "w", encoding="utf-8")
            f.write(json.dumps(doc.to_row(), ensure_ascii=False) + "\n")
            counts[doc.domain] = counts.get(doc.domain, 0) + 1
            held[doc.domain] = held.get(doc.domain, 0) + key[1]
    finally:
        for f in files.values():
            f.close()
    for domain in counts:
        if not held[domain]:
            continue
        trained_on_all = held[domain] == counts[domain]
        with open(path(domain, False), "a", encoding="utf-8") as out, \
                open(path(domain, True), encoding="utf-8") as waiting:
            for line in waiting:
                if trained_on_all:
                    row = json.loads(line)
                    row["metadata"].pop(HELDOUT_KEY, None)
                    line = json.dumps(row, ensure_ascii=False) + "\n"
                out.write(line)
        os.remove(path(domain, True))
        if trained_on_all:
            print(f"dsv3 data prepare: every kept document of domain {domain!r} "
                  f"({counts[domain]}) fell in the held-out share; it holds none out and "
                  f"trains on them all", file=sys.stderr)
            held[domain] = 0
    return counts, held


def _kept_texts(kept_dir: str, domain: str) -> Iterator[str]:
    with open(os.path.join(kept_dir, f"{domain}.jsonl"), encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def _bar(items: Iterator, **kwargs) -> Iterator:
    """A progress bar that appears when iteration starts, not when it is created."""
    yield from tqdm(items, unit="doc", **kwargs)


def _mixture(config: dict, corpus: TokenizedCorpus) -> dict:
    """The schedule to store: the configured one, or constant natural shares of the
    training tokens (the held-out documents are not trained on)."""
    mix = dict(config["mixture"])
    weights = mix.pop("weights", None)
    tokens = {d: int(o[-1]) for d, o in corpus.training_part().offsets.items()}
    if weights is None:
        total = sum(tokens.values())
        weights = {d: n / total for d, n in tokens.items()}
        # shares must sum to 1 within mixture.SUM_TOLERANCE (1e-6): give the rounding
        # to the largest
        biggest = max(weights, key=weights.get)
        weights[biggest] += 1.0 - sum(weights.values())
    missing = sorted(d for d in weights if d not in tokens)
    if missing:
        raise ValueError(f"mixture.weights: domains {missing} have no kept documents "
                         f"(kept: {sorted(tokens)})")
    out = {"weights": weights, "total_tokens": int(mix.pop("total_tokens", sum(tokens.values()))),
           "seed": int(mix.pop("seed", 0)),
           "max_chunk_tokens": int(mix.pop("max_chunk_tokens", 1024))}
    MixtureSchedule(out["weights"], out["total_tokens"])  # validate before saving
    return out


def _resolve_learned_lexicon(config: dict, skip_malformed: bool, max_docs: int = 20_000) -> None:
    """``lexicon = "learned"``: learn neighbours from (up to ``max_docs`` of) the sources'
    training documents in a first pass and put the table in the config, where every
    worker can read it."""
    augment = config["steps"].get("augment", {})
    if augment.get("lexicon") == "learned":
        # not from the held-out documents: their words would be swapped into training text
        chooser = HeldOutChooser(**config["heldout"])
        texts = [d.text for d in itertools.islice(
            (d for d in read_sources(config, skip_malformed, []) if not chooser.held_out(d)),
            max_docs)]
        config["steps"]["augment"] = {**augment, "lexicon": Lexicon.learn(texts).synonyms}


def _outputs(domains, steps) -> list[str]:
    """The files a run writes per domain and per side-file step, relative to --out."""
    return sorted([f"kept/{d}.jsonl" for d in domains] + [f"dropped/{s}.jsonl" for s in steps]
                  + [f"tokens/{d}.{part}.npy" for d in domains for part in ("tokens", "offsets")])


_OUTPUT_RE = re.compile(r"^(kept|dropped)/[A-Za-z0-9_.-]+\.jsonl$"
                        r"|^tokens/[A-Za-z0-9_.-]+\.(tokens|offsets)\.npy$")


def _previous_outputs(out: str) -> set[str]:
    """What the last run into ``out`` listed as written in its stats.json: only those
    may be removed as stale (a run from before the list was kept removes nothing; a
    file of the user's that merely looks like an output is never touched)."""
    try:
        with open(os.path.join(out, "stats.json"), encoding="utf-8") as f:
            listed = json.load(f).get("outputs", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {p for p in listed if isinstance(p, str) and _OUTPUT_RE.match(p)}


def _source_files(config: dict) -> dict[str, int]:
    """Every file the sources read (real path -> source index): never removed or
    replaced, whatever a stats.json lists."""
    files = {}
    for i, src in enumerate(config.get("sources", [])):
        paths = src.get("paths", [])
        for pattern in [paths] if isinstance(paths, str) else paths:
            files.update((os.path.realpath(p), i) for p in glob.glob(os.fspath(pattern)))
    return files


class NothingKeptError(ValueError):
    """Every document was dropped or skipped; the run's counts and side files are kept
    in its staging directory, which the message names, for a look at why."""


def prepare(config: dict, *, progress: bool = True, skip_malformed: bool = False) -> dict:
    """Run the whole preparation; returns what it wrote to ``stats.json``. Outputs an
    earlier run left in the same directory and this run did not rewrite are removed
    at the end (see :func:`_previous_outputs`); a run that fails changes nothing there
    (but for finishing the move of an interrupted run, which comes first).
    ``progress=False`` also silences the progress bars of ``datasets`` (its readers and
    the datasets backend)."""
    config = validate_config(config)  # the CLI's config passes again unchanged
    _check_source_paths(config)
    out = config["output"]["dir"]
    # the directories this run creates (``out`` and those missing above it), innermost
    # first: a run that fails removes them again
    created, missing = [], os.path.abspath(out)
    while not os.path.isdir(missing):
        created.append(missing)
        missing = os.path.dirname(missing)
    os.makedirs(out, exist_ok=True)
    try:
        with exclusive_run(out):
            try:
                return _prepare_into(out, config, progress, skip_malformed)
            except BaseException:
                # a failed run leaves no directory it created: one that holds just the
                # lock file loses that first, while the lock is still held
                if created and os.listdir(out) == [LOCK]:
                    with contextlib.suppress(OSError):
                        os.remove(lock_path(out))
                raise
    finally:
        for directory in created:  # one that holds anything (``out``, once the run
            try:                   # succeeded) stays, and so do those above it
                os.rmdir(directory)
            except OSError:
                break


def _prepare_into(out: str, config: dict, progress: bool, skip_malformed: bool) -> dict:
    """The run, holding ``out``'s lock: finish an interrupted move, stage, move in."""
    interrupted = finish_interrupted(out, _source_files(config))
    if interrupted is not None:
        print(f"dsv3 data prepare: {out!r} was mid-update from an interrupted run: finished "
              f"moving that run's outputs in (from {interrupted!r}) before this run starts",
              file=sys.stderr)
    for dead in _dead_stages(out):
        shutil.rmtree(dead, ignore_errors=True)
        print(f"dsv3 data prepare: removed {dead!r}, the staging directory of a run into "
              f"{out!r} that was killed before it finished", file=sys.stderr)
    stage = tempfile.mkdtemp(prefix=".partial-", dir=out)
    keep_stage = False
    try:
        with datasets_progress(progress):
            stats = _prepare(config, stage, progress, skip_malformed)
        move_in(stage, out, sorted(_previous_outputs(out) - set(stats["outputs"])),
                _source_files(config))
        return stats
    except NothingKeptError:
        keep_stage = True  # for a look at why; the message names it
        raise
    finally:
        # a journal is there once the move is decided: interrupted after that, the stage
        # holds the files not yet moved, which the next run moves in
        if not keep_stage and not os.path.lexists(journal_path(out)):
            shutil.rmtree(stage, ignore_errors=True)


def _dead_stages(out: str) -> list[str]:
    """The stages in ``out`` of runs that died (a kill, a power cut) before they wrote
    their stats.json, or after their move emptied them: a second copy of the outputs,
    or part of one, that nothing will read. Called holding the directory's lock, after
    an interrupted move was finished, so no other run is using one. A stage with a
    stats.json is kept: a run that kept nothing left it for a look at why."""
    return sorted(path for path in glob.glob(os.path.join(glob.escape(out), ".partial-*"))
                  if os.path.isdir(path) and not os.path.islink(path)
                  and not os.path.lexists(os.path.join(path, "stats.json")))


def _prepare(config: dict, stage: str, progress: bool, skip_malformed: bool) -> dict:
    """The run itself, every file written under ``stage``."""
    _resolve_learned_lexicon(config, skip_malformed)
    t0 = time.perf_counter()
    reader_stats: list[dict] = []
    chooser = HeldOutChooser(**config["heldout"])
    review_cfg = config["review"]
    reviewer = ReviewSampler(review_cfg.get("per_stratum", 5), review_cfg.get("seed", 0))
    pipeline = Pipeline(build_steps(config, os.path.join(stage, "dropped")), reviewer=reviewer)
    try:
        sources = _check_mixture_after_reading(
            chooser.mark(read_sources(config, skip_malformed, reader_stats)), config)
        scale = config["scale"]
        if scale["backend"] == "serial":
            docs = pipeline.run(sources, progress=progress)
        else:
            docs = run_scaled(sources, pipeline.steps, config["steps"], scale["backend"],
                              scale["num_proc"], spill_dir=scale.get("spill_dir"),
                              progress=progress)
            docs = _bar(docs, desc="documents kept") if progress else docs
        kept, held = _write_kept(docs, os.path.join(stage, "kept"))
    finally:
        pipeline.close()
    review = reviewer.write(os.path.join(stage, "review"))
    if not kept:
        pipeline.write_stats(os.path.join(stage, "stats.json"),
                             extra={"readers": reader_stats, "review": review})
        raise NothingKeptError(f"no documents were kept: this run's stats.json and dropped/ "
                               f"files are in {stage!r} (delete it when done; the earlier "
                               f"outputs are unchanged)")
    # before the tokenizer is trained: a domain read but wholly dropped
    _missing_mixture_domains(config, kept, " (kept: {})")
    t_steps = time.perf_counter()

    kept_dir = os.path.join(stage, "kept")
    tok_cfg = config["tokenizer"]
    # the training documents only (each domain's held-out ones end its file): a
    # vocabulary fitted to the held-out text would flatter its loss, as a lexicon
    # learned from it would (_resolve_learned_lexicon)
    all_texts = itertools.chain.from_iterable(
        itertools.islice(_kept_texts(kept_dir, d), kept[d] - held[d]) for d in sorted(kept))
    if progress:
        all_texts = _bar(all_texts, desc="training tokenizer",
                         total=sum(kept[d] - held[d] for d in kept))
    tokenizer = train_tokenizer(all_texts, vocab_size=tok_cfg.get("vocab_size", 8192),
                                min_frequency=tok_cfg.get("min_frequency", 2))
    tokenizer.save(os.path.join(stage, "tokenizer.json"))
    by_domain = {d: (_bar(_kept_texts(kept_dir, d), desc=f"tokenizing {d}", total=kept[d])
                     if progress else _kept_texts(kept_dir, d)) for d in sorted(kept)}
    corpus = TokenizedCorpus.encode(by_domain, tokenizer)
    heldout = {**chooser.to_dict(), "documents": {d: held[d] for d in sorted(kept)}}
    corpus = TokenizedCorpus(corpus.tokens, corpus.offsets, corpus.eos_id, corpus.vocab_size,
                             heldout)
    manifest = corpus.save(os.path.join(stage, "tokens"))
    t_tokens = time.perf_counter()

    mixture = _mixture(config, corpus)
    with open(os.path.join(stage, "mixture.json"), "w") as f:
        json.dump(mixture, f, indent=2)
    side_files = {s.name for s in pipeline.steps if s.dropped_writer is not None}
    return pipeline.write_stats(os.path.join(stage, "stats.json"), extra={
        "outputs": _outputs(manifest["domains"], side_files),
        "readers": reader_stats, "kept_by_domain": kept, "heldout": heldout, "review": review,
        "augmentation": {s.name: {"rate": s.rate, "realized_rate": round(s.realized_rate, 4)}
                         for s in pipeline.steps if isinstance(s, Augmenter)}, "tokens": manifest,
        "mixture": mixture,
        "seconds": {"steps": round(t_steps - t0, 3), "tokenize": round(t_tokens - t_steps, 3)},
    })

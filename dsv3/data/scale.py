"""Scale-out: the per-document steps on HF ``datasets.map(num_proc=...)`` or Apache
Spark, with output identical to the plain generator chain.

Only steps that judge each document alone (heuristics, PII, quality) are spread out;
the leading run of them in the configured order goes to the workers, and the rest
(dedup, which must see every earlier document) runs in the driver afterwards.

Workers build their own copies of the steps from the config (step objects hold
writers and counters that do not travel), apply them to each row and return, with
the processed row, a small record: which step dropped it and why, each step's
"modified" counts for it, and the text after every step that changed it. The driver
then replays those records through its own step objects in the original order, so
counters, side files and the spot-check sample come out exactly as a local run makes
them, whatever the number of processes or partitions.

Data movement: the driver streams the input into numbered parquet shards (one shard in
memory at a time) under ``spill_dir``; datasets memory-maps them, Spark reads them as a
DataFrame; results come back in input order (Spark: sorted by the shards' row index,
one partition at a time), and the replay re-reads the shards alongside. What it costs:
the input is written to disk once more, and ``spill_dir`` must be visible to every
worker (local disk in local mode, a shared filesystem on a cluster).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import uuid
from collections import Counter
from typing import Any, Iterable, Iterator

from dsv3.data.config import build_steps
from dsv3.data.document import Document
from dsv3.data.step import Step

# "inline" runs the workers' code path in this process: the replay without the cluster
BACKENDS = ("inline", "datasets", "spark")

# Per process: the steps of the run it last served, built once. Keyed by the run too: a
# process serves several runs (inline, Spark's reused Python workers, a notebook), and a
# quality model or lexicon file rewritten at the same path between them must be read
# again (the old model kept scoring); only the last run's are kept (each holds a model).
_WORKER_STEPS: dict[str, list[Step]] = {}
# The process that imported this module. datasets.map's workers are forked from it and
# inherit its torch, whose OpenMP thread pool (started by, e.g., the quality model's
# initialisation in the driver) does not survive a fork: libgomp's first parallel
# region in the child waits forever for the parent's threads.
_IMPORTING_PID = os.getpid()


def split_steps(steps: list[Step]) -> tuple[list[Step], list[Step]]:
    """(leading per-document steps, the rest)."""
    n = 0
    while n < len(steps) and not steps[n].stateful:
        n += 1
    return steps[:n], steps[n:]


def _worker_steps(steps_config: dict, run: str) -> list[Step]:
    key = run + json.dumps(steps_config, sort_keys=True)
    steps = _WORKER_STEPS.get(key)
    if steps is None:
        _one_thread_if_forked()
        steps = split_steps(build_steps({"steps": steps_config}, dropped_dir=None))[0]
        _WORKER_STEPS.clear()
        _WORKER_STEPS[key] = steps
    return steps


def _one_thread_if_forked() -> None:
    """In a forked worker, torch on one thread: it never enters the inherited OpenMP
    pool, and the num_proc workers share the cores anyway."""
    torch = sys.modules.get("torch")
    if torch is not None and os.getpid() != _IMPORTING_PID:
        torch.set_num_threads(1)


def process_row(row: dict, steps: list[Step]) -> dict:
    """Apply the per-document steps to one row; returns the row as it leaves them and
    the record the driver replays."""
    doc = Document(row["id"], row["text"], row["domain"], json.loads(row["metadata"]))
    record: dict[str, Any] = {"dropped_by": None, "reason": None, "modified": {}, "counts": {},
                              "texts": {}}
    for step in steps:
        if not step.applies_to(doc):
            continue
        before, counts, text = Counter(step.stats.modified), Counter(step.stats.counts), doc.text
        result = step.apply(doc)
        for key, now, then in (("modified", step.stats.modified, before),
                               ("counts", step.stats.counts, counts)):
            if now - then:
                record[key][step.name] = dict(now - then)
        if isinstance(result, str):
            record["dropped_by"], record["reason"] = step.name, result
            break
        doc = result
        if doc.text != text:
            record["texts"][step.name] = doc.text
    return {"idx": row["idx"], "id": doc.id, "text": doc.text, "domain": doc.domain,
            "metadata": json.dumps(doc.metadata, ensure_ascii=False),
            "record": json.dumps(record, ensure_ascii=False)}


_COLUMNS = ("idx", "id", "text", "domain", "metadata")


def _spill(docs: Iterable[Document], directory: str, rows_per_shard: int
           ) -> tuple[list[str], int]:
    """Write the input to numbered parquet shards with a global row index, holding one
    shard in memory at a time; the workers read the shards, the replay re-reads them.
    Returns the shards and the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = pa.schema([("idx", pa.int64())] + [(c, pa.string()) for c in _COLUMNS[1:]])
    paths: list[str] = []
    rows: list[dict] = []

    def flush() -> None:
        path = os.path.join(directory, f"shard-{len(paths):06d}.parquet")
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
        paths.append(path)
        rows.clear()

    n_rows = 0
    for idx, d in enumerate(docs):
        rows.append({"idx": idx, "id": d.id, "text": d.text, "domain": d.domain,
                     "metadata": json.dumps(d.metadata, ensure_ascii=False)})
        n_rows += 1
        if len(rows) == rows_per_shard:
            flush()
    if rows or not paths:
        flush()
    return paths, n_rows


def _read_shards(paths: list[str]) -> Iterator[dict]:
    import pyarrow.parquet as pq
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()


def _map_batch(batch: dict, steps_config: dict, run: str) -> dict:
    steps = _worker_steps(steps_config, run)
    out = [process_row(dict(zip(batch, values)), steps) for values in zip(*batch.values())]
    return {k: [r[k] for r in out] for k in out[0]} if out else {}


@contextlib.contextmanager
def datasets_progress(enabled: bool) -> Iterator[None]:
    """datasets' own bars ("Generating train split", the map's) off while this runs when
    ``enabled`` is false; the global switch is put back after, so a library user who
    wants them elsewhere keeps them. Enabled leaves the user's setting alone."""
    if enabled:
        yield
        return
    try:  # imported only to silence it: a serial run need not load datasets at all
        import datasets
    except ImportError:  # not installed: no bars of its own to silence
        yield
        return
    switch = not datasets.are_progress_bars_disabled()
    if switch:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if switch:
            datasets.enable_progress_bars()


def _on_datasets(paths: list[str], steps_config: dict, run: str, num_proc: int,
                 cache_dir: str, progress: bool = True) -> Iterator[dict]:
    import datasets
    # memory-mapped from the shards; the cache lives in this run's spill directory, so
    # nothing from an earlier run can be picked up. Both calls do their work (and draw
    # their bars) here; iterating the mapped dataset below draws none.
    with datasets_progress(progress):
        ds = datasets.Dataset.from_parquet(paths, cache_dir=cache_dir)
        mapped = ds.map(_map_batch, batched=True, batch_size=64, num_proc=num_proc,
                        fn_kwargs={"steps_config": steps_config, "run": run},
                        desc="per-document steps",
                        remove_columns=ds.column_names, load_from_cache_file=False)
    yield from mapped


def _on_spark(paths: list[str], steps_config: dict, run: str, num_proc: int) -> Iterator[dict]:
    import sys
    from pyspark.sql import SparkSession
    # Spark's Python workers must be this interpreter (same packages), not `python3`
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # our own progress bar and stats say what happens; Spark's console bar and INFO/WARN
    # lines would bury them
    spark = (SparkSession.builder.master(f"local[{num_proc}]").appName("dsv3-data")
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")

    def partition(it):
        steps = _worker_steps(steps_config, run)
        for row in it:
            yield process_row(row.asDict(), steps)

    # the shards' row index restores input order; toLocalIterator brings one partition
    # at a time to the driver instead of collecting everything
    rdd = spark.read.parquet(*paths).rdd.mapPartitions(partition)
    yield from rdd.sortBy(lambda r: r["idx"], numPartitions=num_proc).toLocalIterator()


def run_scaled(docs: Iterable[Document], steps: list[Step], steps_config: dict,
               backend: str, num_proc: int, spill_dir: str | None = None,
               rows_per_shard: int = 10_000, progress: bool = True) -> Iterator[Document]:
    """Like chaining ``steps`` over ``docs``, with the leading per-document steps run
    on ``backend``. ``spill_dir``: where the input shards go (a directory every worker
    can read; a fresh temporary directory under it is used and removed). ``progress``:
    false silences the backend's own progress bars (datasets'; Spark's are always off)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if num_proc < 1:
        raise ValueError(f"num_proc must be >= 1, got {num_proc}")
    mapped_steps, rest = split_steps(steps)
    run = uuid.uuid4().hex  # the workers build this run's steps afresh (_WORKER_STEPS)
    with tempfile.TemporaryDirectory(prefix="dsv3-scale-", dir=spill_dir) as tmp:
        paths, n_rows = _spill(docs, tmp, rows_per_shard)
        if n_rows == 0:  # nothing to map (datasets cannot read a shard with no rows)
            results = iter(())
        elif backend == "datasets":
            results = _on_datasets(paths, steps_config, run, num_proc,
                                   os.path.join(tmp, "cache"), progress)
        elif backend == "spark":
            results = _on_spark(paths, steps_config, run, num_proc)
        else:
            local = _worker_steps(steps_config, run)
            results = (process_row(r, local) for r in _read_shards(paths))
        stream: Iterable[Document] = _replay(_read_shards(paths), results, mapped_steps)
        for step in rest:
            stream = step(stream)
        yield from stream


def _replay(inputs: Iterable[dict], results: Iterable[dict],
            steps: list[Step]) -> Iterator[Document]:
    """Drive the driver's step objects through the workers' records, in input order."""
    for src, out in zip(inputs, results, strict=True):
        if src["idx"] != out["idx"]:
            raise RuntimeError(f"scale-out returned row {out['idx']} where row {src['idx']} "
                               f"was expected: the backend lost the input order")
        rec = json.loads(out["record"])
        doc = Document(src["id"], src["text"], src["domain"], json.loads(src["metadata"]))
        final_meta = json.loads(out["metadata"])
        for step in steps:
            step.stats.seen += 1
            if not step.applies_to(doc):
                step.stats.kept += 1
                continue
            step.stats.modified.update(rec["modified"].get(step.name, {}))
            step.stats.counts.update(rec["counts"].get(step.name, {}))
            if rec["dropped_by"] == step.name:
                doc.metadata = final_meta  # what earlier steps had learned by then
                step.drop(doc, rec["reason"])
                break
            before = None
            if step.name in rec["texts"]:
                before = doc.text
                doc = Document(doc.id, rec["texts"][step.name], doc.domain, doc.metadata)
            step.keep(doc, before)
        else:
            yield Document(out["id"], out["text"], out["domain"], final_meta)

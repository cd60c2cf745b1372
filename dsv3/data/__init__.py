"""dsv3.data: the data pipeline (a layer of its own: it imports nothing from the model side).

Every step follows one contract (:mod:`~dsv3.data.step`): a generator over
:class:`Document` that counts what it keeps, drops and changes and why, and can write
dropped documents with their reason to a jsonl side file.

    sources      corpus (embedded stdlib text), readers (jsonl / parquet / text)
    steps        heuristics (+ textview), pii, quality, dedup, augment
    running      pipeline (serial), scale (datasets.map / Spark), config + prepare,
                 movein (the outputs moved in so that an interruption can be finished)
    audit        review (spot-check sample, precision from verdicts)
    training     tokenizer (BPE + token arrays), mixture (schedules, sampler), loader

``dsv3 data prepare --config FILE`` runs it all; the trainer reads the result with
``dsv3.data.loader.PackedLoader.from_prepared(directory, seq_len, batch_size)``.
"""
from dsv3.data.document import Document
from dsv3.data.pipeline import Pipeline
from dsv3.data.step import DroppedWriter, Step, StepStats

__all__ = ["Document", "DroppedWriter", "Pipeline", "Step", "StepStats"]

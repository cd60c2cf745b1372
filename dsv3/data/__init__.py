"""dsv3.data: the data pipeline (a layer of its own: it imports nothing from the model side).

Every step follows one contract (:mod:`dsv3.data.step`): a generator over
:class:`Document` that counts what it keeps and drops and why, and can write dropped
documents with their reason to a jsonl side file. ``dsv3 data prepare --config FILE``
chains them (:mod:`dsv3.data.prepare`); the trainer reads the packed output through
:mod:`dsv3.data.loader`.
"""
from dsv3.data.document import Document
from dsv3.data.pipeline import Pipeline
from dsv3.data.step import DroppedWriter, Step, StepStats

__all__ = ["Document", "DroppedWriter", "Pipeline", "Step", "StepStats"]

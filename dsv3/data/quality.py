"""Quality classifier: a frozen featurizer + a trained linear head, and its filter step.

Two featurizers behind one interface (texts -> features):

- ``hashed`` (built in, fast): word 1-2-grams from the shared tokenization plus
  character 3-grams, hashed (xxhash, stable across processes) into ``2**dim_bits``
  buckets; the head is then a fastText-style linear model over the bag of buckets
  (``EmbeddingBag`` of width 1). Trains in seconds on a CPU, no download.
- ``hf``: any HF encoder from a local path (a BERT such as ``bert-base-chinese``),
  frozen, mean-pooled over tokens; the head is a ``Linear`` on those vectors. Slower
  and needs the model, but carries semantics the n-grams cannot.

Both heads are trained with logistic loss; a document is kept when its probability
of being good reaches the threshold. ``train_quality`` trains on labeled jsonl and
reports precision/recall of the "good" class on a held-out split, at the threshold
it saves with the model: the one the filter uses unless given another.
"""
from __future__ import annotations

import json
import os
import random
import uuid
import warnings
from typing import Sequence

import numpy as np
import torch
import xxhash

from dsv3.data.document import Document
from dsv3.data.readers import jsonl_records
from dsv3.data.step import Step
from dsv3.data.textview import WORDS_VERSION, TextView
from dsv3.validate import number, whole_number
from dsv3.whole_files import write_text_whole, write_whole

BACKENDS = ("hashed", "hf")


# The rules for train_quality's settings. `dsv3 data train-quality` applies them too,
# labelled with its options' names, before it reads the data or loads an encoder.
def check_epochs(epochs: int, label: str = "epochs") -> None:
    whole_number(label, epochs, 1)  # 0 would leave the zero-initialized head: P(good) = 0.5


def check_threshold(threshold: float, label: str = "threshold") -> None:
    number(label, threshold, 0, 1)  # a probability


def check_holdout(holdout: float, label: str = "holdout") -> None:
    number(label, holdout, 0, 1, low_open=True, high_open=True)  # the held-out fraction


def check_encoder(path: str | None, backend: str = "hf", label: str = "encoder") -> None:
    """The hf backend needs an encoder, and one given must be a local model directory."""
    if backend == "hf" and not path:
        raise ValueError(f"{label}: the 'hf' backend needs a local model directory")
    if path and not os.path.isdir(path):
        raise FileNotFoundError(f"{label}: {path!r} is not a local model directory")


class TokenizationChangedWarning(UserWarning):
    """A hashed model was trained on words of another ``TextView`` version."""


class HashedNgrams:
    """Texts -> (flat bucket ids, offsets) for ``nn.EmbeddingBag``.

    Features always come from the current ``TextView.words``; ``words_version`` records
    which version a model's head was trained on (saved in featurizer.json), so a model
    from before a tokenisation change is recognised when loaded."""

    scores_depend_on_batch = False  # each text's features are its own

    def __init__(self, dim_bits: int = 18, max_chars: int = 20_000,
                 words_version: int = WORDS_VERSION) -> None:
        if not 8 <= dim_bits <= 24:
            raise ValueError(f"dim_bits must be in [8, 24], got {dim_bits}")
        self.dim_bits, self.max_chars = dim_bits, max_chars
        self.words_version = words_version
        self.size = 1 << dim_bits

    def ids(self, text: str) -> np.ndarray:
        text = text[:self.max_chars]
        words = [w.lower() for w in TextView(text).words]
        grams = words + [a + " " + b for a, b in zip(words, words[1:])]
        low = text.lower()
        grams += ["#" + low[i:i + 3] for i in range(len(low) - 2)]
        mask = self.size - 1
        return np.fromiter((xxhash.xxh64_intdigest(g.encode()) & mask for g in grams),
                           dtype=np.int64, count=len(grams))

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        per_doc = [self.ids(t) for t in texts]
        lengths = [len(x) for x in per_doc]
        # one offset per text (each bag starts where the previous ends): no texts, no bags
        offsets = torch.tensor(np.cumsum([0] + lengths)[:-1], dtype=torch.int64)
        flat = (torch.from_numpy(np.concatenate(per_doc)) if per_doc
                else torch.empty(0, dtype=torch.int64))
        return flat, offsets

    def config(self) -> dict:
        return {"backend": "hashed", "dim_bits": self.dim_bits, "max_chars": self.max_chars,
                "words_version": self.words_version}


class HFEncoder:
    """A frozen HF encoder from a local directory; mean of the last hidden states.

    The directory is kept as an absolute path (a saved model's featurizer.json names
    it): a relative one loaded only from the directory it was trained in. A text's
    features depend, in the last bits, on the batch it was padded in (the matmuls'
    shapes change), so the filter scores one text at a time with it
    (``scores_depend_on_batch``): the same score whatever the backend or batching."""

    scores_depend_on_batch = True

    def __init__(self, path: str, max_length: int = 256, batch_size: int = 16) -> None:
        check_encoder(path)
        from transformers import AutoModel, AutoTokenizer
        path = os.path.abspath(path)
        self.path, self.max_length, self.batch_size = path, max_length, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.size = self.model.config.hidden_size

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True,
                                 truncation=True, max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
        return torch.cat(out) if out else torch.empty(0, self.size)

    def config(self) -> dict:
        return {"backend": "hf", "path": self.path, "max_length": self.max_length}


class QualityClassifier:
    def __init__(self, featurizer: HashedNgrams | HFEncoder, threshold: float = 0.5) -> None:
        check_threshold(threshold)
        self.featurizer = featurizer
        self.threshold = threshold  # saved with the model: QualityFilter's default
        if isinstance(featurizer, HashedNgrams):
            self.head: torch.nn.Module = torch.nn.EmbeddingBag(featurizer.size, 1, mode="mean")
            torch.nn.init.zeros_(self.head.weight)
        else:
            self.head = torch.nn.Linear(featurizer.size, 1)
        self.bias = torch.nn.Parameter(torch.zeros(1))
        # dense encoder features are standardized with training statistics: pooled
        # hidden states have uneven scales per dimension, which slows a linear head
        self.mean = torch.zeros(featurizer.size if isinstance(featurizer, HFEncoder) else 0)
        self.std = torch.ones_like(self.mean)

    def _logits(self, features) -> torch.Tensor:
        if isinstance(features, tuple):
            return self.head(*features).squeeze(-1) + self.bias
        return self.head((features - self.mean) / self.std).squeeze(-1) + self.bias

    def fit(self, texts: Sequence[str], labels: Sequence[int], epochs: int = 20,
            lr: float = 0.5, seed: int = 0) -> "QualityClassifier":
        if len(texts) != len(labels) or not texts:
            raise ValueError(f"texts and labels must be non-empty and of equal length, got "
                             f"{len(texts)} and {len(labels)}")
        check_epochs(epochs)
        torch.manual_seed(seed)
        features = self.featurizer(texts)
        if isinstance(self.featurizer, HashedNgrams):  # the head now learns today's words
            self.featurizer.words_version = WORDS_VERSION
        if not isinstance(features, tuple):
            self.mean, self.std = features.mean(0), features.std(0).clamp(min=1e-6)
        y = torch.tensor(labels, dtype=torch.float32)
        params = list(self.head.parameters()) + [self.bias]
        # the dense head sees standardized features of unit scale, where the bag-of-buckets
        # head's mean-pooled weights need the larger step
        dense = not isinstance(self.featurizer, HashedNgrams)
        opt = torch.optim.Adam(params, lr=lr / 10 if dense else lr)
        for _ in range(epochs):  # full batch: the corpora this trains on fit in memory
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(self._logits(features), y)
            loss.backward()
            opt.step()
        return self

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return torch.sigmoid(self._logits(self.featurizer(texts))).numpy()

    def save(self, directory: str) -> None:
        """head.pt and featurizer.json, each written whole, and tagged with one new id:
        a save cut short between the two leaves a pair that ``load`` refuses, not a
        head scored on another run's features."""
        os.makedirs(directory, exist_ok=True)
        model_id = uuid.uuid4().hex
        state = {"head": self.head.state_dict(), "bias": self.bias.detach(), "mean": self.mean,
                 "std": self.std, "threshold": self.threshold, "model_id": model_id}
        write_whole(os.path.join(directory, "head.pt"), lambda f: torch.save(state, f))
        text = json.dumps({**self.featurizer.config(), "model_id": model_id})
        write_text_whole(os.path.join(directory, "featurizer.json"), text)

    @classmethod
    def load(cls, directory: str) -> "QualityClassifier":
        """The saved model. A hashed model saved with another word tokenisation than
        this code's (those saved without ``words_version`` in featurizer.json predate
        version 2) loads with a :class:`TokenizationChangedWarning`, not an error: its
        features are unchanged on ASCII, precomposed and CJK text, so it still scores
        most corpora as trained, but text with combining marks (Hindi, Hebrew, Arabic
        points, decomposed accents) gets different buckets and shifted scores; retrain
        it with `dsv3 data train-quality`."""
        path = os.path.join(directory, "featurizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"model: no featurizer.json in {directory!r} "
                                    f"(train one with `dsv3 data train-quality`)")
        with open(path) as f:
            cfg = json.load(f)
        featurizer = (_hashed_from_config(cfg, directory) if cfg["backend"] == "hashed"
                      else HFEncoder(cfg["path"], cfg["max_length"]))
        state = torch.load(os.path.join(directory, "head.pt"), weights_only=True)
        if state.get("model_id") != cfg.get("model_id"):  # both absent: saved before the ids
            raise ValueError(f"model: head.pt and featurizer.json in {directory!r} come from "
                             f"different saves (one was cut short?); train the model again")
        model = cls(featurizer, state.get("threshold", 0.5))
        model.head.load_state_dict(state["head"])
        model.bias.data.copy_(state["bias"])
        model.mean, model.std = state["mean"], state["std"]
        return model


def _hashed_from_config(cfg: dict, directory: str) -> HashedNgrams:
    """The saved hashed featurizer; warns when its model learned other words than
    ``TextView`` now gives (1: saved before the version was recorded)."""
    version = cfg.get("words_version", 1)
    if version != WORDS_VERSION:
        warnings.warn(
            f"quality model {directory!r} was trained on word tokenisation version "
            f"{version}, this code tokenises with version {WORDS_VERSION}: text with "
            f"combining marks (Hindi, Hebrew, Arabic, decomposed accents) gets other "
            f"features than in training, and its scores shift. Retrain the model with "
            f"`dsv3 data train-quality`.", TokenizationChangedWarning, stacklevel=3)
    return HashedNgrams(cfg["dim_bits"], cfg["max_chars"], words_version=version)


def make_featurizer(backend: str, encoder: str | None = None, **kwargs):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "hf":
        return HFEncoder(encoder, **kwargs)
    return HashedNgrams(**kwargs)


def read_labeled(path: str, text_field: str = "text", label_field: str = "label"):
    """(texts, labels) from jsonl; labels 1/true = good, 0/false = bad."""
    texts, labels = [], []
    for n, rec, error in jsonl_records(path):
        if error is not None:
            raise ValueError(f"{path}, line {n}: {error}")
        if not isinstance(rec, dict):
            raise ValueError(f"{path}, line {n}: expected a JSON object, got a {type(rec).__name__}")
        missing = [field for field in (text_field, label_field) if field not in rec]
        if missing:  # "must be a string, got None" hid that the field is not there at all
            raise ValueError(f"{path}, line {n}: no field {missing[0]!r} (fields: "
                             f"{sorted(rec)})")
        text, label = rec[text_field], rec[label_field]
        if not isinstance(text, str):
            raise ValueError(f"{path}, line {n}: field {text_field!r} must be a string")
        if label not in (0, 1, True, False):
            raise ValueError(f"{path}, line {n}: field {label_field!r} must be 0/1 or "
                             f"true/false, got {label!r}")
        texts.append(text)
        labels.append(int(label))
    return texts, labels


def precision_recall(probs: np.ndarray, labels: Sequence[int], threshold: float) -> dict:
    pred = probs >= threshold
    y = np.asarray(labels, dtype=bool)
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1),
            "accuracy": float((pred == y).mean()) if len(y) else 0.0, "n": len(y),
            "threshold": threshold}


def train_quality(texts: Sequence[str], labels: Sequence[int], featurizer, out_dir: str,
                  holdout: float = 0.2, threshold: float = 0.5, seed: int = 0,
                  epochs: int = 20) -> dict:
    """Train on a seeded (1 - holdout) split, report on the rest, save model + metrics."""
    # checked before any training, so a bad value costs nothing and saves no model
    # (epochs: by fit, before it featurizes anything)
    check_holdout(holdout)
    check_threshold(threshold)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    cut = int(round(len(order) * (1 - holdout)))
    train, test = order[:cut], order[cut:]
    if not test or len({labels[i] for i in train}) < 2:
        raise ValueError(f"labels: need both classes in training and a non-empty held-out "
                         f"split; got {len(train)} train / {len(test)} held out")
    model = QualityClassifier(featurizer).fit([texts[i] for i in train],
                                              [labels[i] for i in train], epochs=epochs, seed=seed)
    metrics = precision_recall(model.predict_proba([texts[i] for i in test]),
                               [labels[i] for i in test], threshold)
    metrics["train_n"] = len(train)
    model.threshold = threshold
    model.save(out_dir)
    text = json.dumps(metrics, indent=2)
    write_text_whole(os.path.join(out_dir, "metrics.json"), text)
    return metrics


class QualityFilter(Step):
    """Keeps documents whose predicted probability of being good reaches ``threshold``
    (by default the one the model was trained and reported at, 0.5 for a model saved
    before thresholds were); the score goes into ``metadata["quality"]``. As a
    generator it scores documents in batches of ``batch_size`` (cheaper per document);
    :meth:`apply`, used by the scale-out workers, scores one at a time, and so does the
    generator with an HF encoder, whose scores would otherwise move with the batch
    (:class:`HFEncoder`) and could fall on either side of the threshold by backend."""

    name = "quality"

    def __init__(self, model: str | QualityClassifier, threshold: float | None = None,
                 batch_size: int = 32, **kwargs) -> None:
        super().__init__(**kwargs)
        if threshold is not None:
            check_threshold(threshold)
        whole_number("batch_size", batch_size, 1)
        self.model = QualityClassifier.load(model) if isinstance(model, str) else model
        self.threshold = self.model.threshold if threshold is None else threshold
        self.batch_size = batch_size

    def _decide(self, doc: Document, score: float) -> Document | str:
        doc.metadata["quality"] = round(score, 4)
        return doc if score >= self.threshold else "low_quality_score"

    def apply(self, doc: Document) -> Document | str:
        return self._decide(doc, float(self.model.predict_proba([doc.text])[0]))

    def run(self, docs):
        batch: list[Document] = []

        def flush():
            judged = [d for d in batch if self.applies_to(d)]
            scores = iter(self.model.predict_proba([d.text for d in judged]) if judged else [])
            for doc in batch:
                self.stats.seen += 1
                if not self.applies_to(doc):
                    self.stats.kept += 1
                    yield doc
                    continue
                result = self._decide(doc, float(next(scores)))
                if isinstance(result, str):
                    self.drop(doc, result)
                else:
                    yield self.keep(result)
            batch.clear()

        size = 1 if self.model.featurizer.scores_depend_on_batch else self.batch_size
        for doc in docs:
            batch.append(doc)
            if len(batch) == size:
                yield from flush()
        yield from flush()

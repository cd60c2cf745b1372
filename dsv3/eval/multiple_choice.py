"""Multiple-choice harness for MMLU/BBH-format jsonl tasks: rows of
``{"question", "choices": [...], "answer": index | letter | choice text}`` with an
optional ``"level"`` (for dynamic difficulty) and ``"split"``: ``"test"`` (the default:
scored) or ``"dev"`` (the few-shot pool, never scored). Any other split ("validation",
"train", "DEV") is refused rather than guessed: MMLU's "validation" is not its few-shot
pool, and a row scored or not by a typo changes the result; map yours to one of the two.
An answer that is the exact text of a choice means that choice; a single capital letter
that is no choice's text is a letter index (A = 0). A letter that is both (choices
["C", "A", "D"], answer "A") is refused as ambiguous: give an index.
Choices must differ (two equal choices would split the credit of one answer). Levels
go on every test row or on none: a file mixing both is refused, since a row without
a level belongs to no level and would never be evaluated (dev rows may omit it: the
few-shot pool is not split by level).

Each choice is scored by log p(choice tokens | prompt); the prediction is the choice
with the highest **length-normalized** score (sum / number of choice tokens), so long
answers are not punished for being long; the unnormalized sum is reported too.
Ties are broken fairly and deterministically: an item whose correct choice ties with
t - 1 others for the best score earns 1/t (the expectation of a uniform random
tie-break), so a model with all-equal logits scores chance exactly, not the accuracy
of "always pick the first choice". Scores within ``TIE_TOLERANCE`` count as tied
(fp64 sums of identical fp32 log-probs, summed in different orders).

Few-shot: k exemplars drawn from the dev rows with ``random.Random(seed)``, never the
item itself, written before the question with their correct answer. A prompt longer
than the model's context loses its start (the first exemplars, then the question's
beginning: ``scoring``); the results count such items as ``truncated_prompts``.
Accuracy comes with a 95% Wilson interval (``stats``).
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass, field

from dsv3.eval.jsonl import read_jsonl_rows, require_str
from dsv3.eval.scoring import context_cut, context_limit, score_continuations
from dsv3.eval.stats import rate_summary

TIE_TOLERANCE = 1e-9
DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
SPLITS = ("test", "dev")  # a row without "split" is a test row


@dataclass(frozen=True)
class MCItem:
    question: str
    choices: tuple[str, ...]
    answer: int
    level: int | None = None
    # "multiple-choice file: PATH:LINE" of a file's row, for messages; not part of the item
    where: str | None = field(default=None, compare=False, repr=False)


def _answer_index(answer, choices, where: str) -> int:
    letter = (string.ascii_uppercase.index(answer) if isinstance(answer, str)
              and len(answer) == 1 and answer in string.ascii_uppercase else None)
    if isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    elif isinstance(answer, str) and answer in choices:
        index = choices.index(answer)
        if letter is not None and letter != index and letter < len(choices):
            raise ValueError(f"{where}: answer {answer!r} is ambiguous: it is the text of "
                             f"choice {index} but, as a letter, means choice {letter} "
                             f"({choices[letter]!r}); give the answer as an index")
    elif letter is not None:
        index = letter
    else:
        raise ValueError(f"{where}: answer must be an index, a letter or one of the choices, "
                         f"got {answer!r}")
    if not 0 <= index < len(choices):
        raise ValueError(f"{where}: answer {answer!r} is outside the {len(choices)} choices")
    return index


def make_item(row: dict, where: str = "item") -> MCItem:
    choices = row.get("choices")
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(
            isinstance(c, str) and c for c in choices):
        raise ValueError(f"{where}: choices must be a list of at least 2 non-empty strings, "
                         f"got {choices!r}")
    repeated = next((c for i, c in enumerate(choices) if c in choices[:i]), None)
    if repeated is not None:
        raise ValueError(f"{where}: choices must differ, got {repeated!r} more than once "
                         f"in {list(choices)!r}")
    level = row.get("level")
    if level is not None and (isinstance(level, bool) or not isinstance(level, int)):
        raise ValueError(f"{where}: level must be an int, got {level!r}")
    return MCItem(require_str(row, "question", where), tuple(choices),
                  _answer_index(row["answer"], list(choices), where), level, where)


def _split(row: dict, where: str) -> str:
    split = row.get("split", "test")
    if split not in SPLITS:
        raise ValueError(f"{where}: split must be one of {list(SPLITS)} (or absent: test), "
                         f"got {split!r}")
    return split


def _check_levels(test: list[tuple[str, MCItem]]) -> None:
    """Levels on every test row or on none (see the module docstring)."""
    with_level = [where for where, it in test if it.level is not None]
    without = [where for where, it in test if it.level is None]
    if with_level and without:
        raise ValueError(f"{without[0]} has no 'level' but {with_level[0].rpartition(': ')[2]} "
                         f"has one; give every test row a level, or none")


def read_mc_file(path: str) -> tuple[list[MCItem], list[MCItem]]:
    """(test items, dev items) of a task file; rows with "split": "dev" are the dev pool."""
    rows = read_jsonl_rows(path, ("question", "choices", "answer"), what="multiple-choice file")
    test, dev = [], []
    for where, row in rows:
        (dev if _split(row, where) == "dev" else test).append((where, make_item(row, where)))
    if not test:
        raise ValueError(f"multiple-choice file: {path} holds only dev rows (\"split\": "
                         f"\"dev\"); nothing to evaluate")
    _check_levels(test)
    return [it for _, it in test], [it for _, it in dev]


def build_prompts(items: list[MCItem], dev: list[MCItem] = (), k_shot: int = 0, seed: int = 0,
                  template: str = DEFAULT_TEMPLATE) -> list[str]:
    """The prompt text per item: k solved dev exemplars, then the question."""
    if isinstance(k_shot, bool) or not isinstance(k_shot, int) or k_shot < 0:
        raise ValueError(f"k_shot must be an int >= 0, got {k_shot!r}")
    if "{question}" not in template:
        raise ValueError(f"template must contain '{{question}}', got {template!r}")
    rng = random.Random(seed)
    prompts = []
    for item in items:
        pool = [d for d in dev if d != item]
        if k_shot > len(pool):
            raise ValueError(f"k_shot={k_shot} exceeds the {len(pool)} dev exemplars available")
        shots = rng.sample(pool, k_shot)
        prefix = "".join(template.format(question=s.question) + " " + s.choices[s.answer] + "\n\n"
                         for s in shots)
        prompts.append(prefix + template.format(question=item.question))
    return prompts


def item_credit(scores: list[float], answer: int) -> float:
    """1/t when the answer is among the t choices tied for the best score, else 0."""
    best = max(scores)
    tied = [i for i, s in enumerate(scores) if s >= best - TIE_TOLERANCE * max(1.0, abs(best))]
    return 1.0 / len(tied) if answer in tied else 0.0


def score_items(model, codec, items: list[MCItem], prompts: list[str], batch_size: int = 8,
                progress: bool = False) -> list[dict]:
    """Per item: the summed log-prob and token count of every choice (" " + choice), and
    whether the prompt was cut to fit the context for any of them."""
    prefix = [codec.eos_id] if codec.eos_id is not None else []
    limit = context_limit(model)
    requests, owners = [], []
    per_item = [{"sums": [], "lengths": [], "truncated": False} for _ in items]
    for i, (item, prompt) in enumerate(zip(items, prompts, strict=True)):
        context = prefix + codec.encode(prompt)
        for choice in item.choices:
            requests.append((context, codec.encode(" " + choice)))
            owners.append(i)
            if context_cut(len(context), len(requests[-1][1]), limit):
                per_item[i]["truncated"] = True
    scored = score_continuations(model, requests, batch_size, progress, desc="multiple choice")
    for i, result in zip(owners, scored):
        per_item[i]["sums"].append(result.logprobs.sum().item())
        per_item[i]["lengths"].append(result.logprobs.numel())
    return per_item


def accuracy_of(items: list[MCItem], per_item: list[dict]) -> dict:
    """Normalized and unnormalized accuracy with 95% intervals, chance level, per level."""
    normalized = [item_credit([s / n for s, n in zip(p["sums"], p["lengths"])], it.answer)
                  for it, p in zip(items, per_item)]
    unnormalized = [item_credit(p["sums"], it.answer) for it, p in zip(items, per_item)]
    n = len(items)
    result = {"accuracy": rate_summary(sum(normalized), n),
              "accuracy_unnormalized": rate_summary(sum(unnormalized), n),
              "chance": sum(1 / len(it.choices) for it in items) / n if n else float("nan")}
    levels = sorted({it.level for it in items if it.level is not None})
    if levels:
        result["by_level"] = {}
        for level in levels:
            credits = [c for c, it in zip(normalized, items) if it.level == level]
            result["by_level"][str(level)] = rate_summary(sum(credits), len(credits))
    return result


def evaluate_multiple_choice(model, codec, items: list[MCItem], dev: list[MCItem] = (),
                             k_shot: int = 0, seed: int = 0, template: str = DEFAULT_TEMPLATE,
                             batch_size: int = 8, progress: bool = False) -> dict:
    if not items:
        raise ValueError("items must not be empty")
    prompts = build_prompts(items, list(dev), k_shot, seed, template)
    per_item = score_items(model, codec, items, prompts, batch_size, progress)
    return {**accuracy_of(items, per_item), "k_shot": k_shot,
            "truncated_prompts": sum(p["truncated"] for p in per_item)}

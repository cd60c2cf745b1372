"""The evaluation matrix: runs the named tasks on one model and gathers one results
dict (what ``eval.json`` holds and the reports render).

Task names: ``ppl`` (held-out perplexity per domain), ``cloze`` (built-in cloze at
the current difficulty level), ``mc:PATH`` (a multiple-choice jsonl; by level when its
rows carry levels), ``gen:PATH`` (BLEU/chrF on source/reference jsonl), ``toxicity``
(needs a lexicon or classifier), ``bias`` (needs a template/term spec), ``lm-eval:TASK``
(through the lm-eval adapter; needs lm-eval and network). Leveled tasks move through
their difficulty schedule, saved in ``difficulty_state`` between runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from dsv3.eval import cloze, corpus, difficulty, generation, multiple_choice, perplexity, safety

SIMPLE_TASKS = ("ppl", "cloze", "toxicity", "bias")
PATH_TASKS = ("mc", "gen", "lm-eval")
TOXICITY_PROMPT_WORDS = 8


@dataclass
class EvalOptions:
    documents: list[tuple[str, str]] | None = None  # None: the embedded corpus' held-out split
    batch_size: int = 8
    seed: int = 0
    k_shot: int = 0
    cloze_items: int = 40
    threshold: float = 0.85
    difficulty_state: str | None = None  # None: schedules live only for this run
    max_new_tokens: int = 32
    toxicity_lexicon: str | None = None
    toxicity_classifier: str | None = None
    toxicity_prompts: str | None = None  # jsonl of {"prompt"}; None: starts of the documents
    bias_spec: str | None = None
    lm_eval_limit: int | None = None
    progress: bool = True


def parse_tasks(spec: str) -> list[str]:
    """'ppl,cloze,mc:path.jsonl' -> ['ppl', 'cloze', 'mc:path.jsonl'], each checked."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"tasks must be a comma-separated list, got {spec!r}")
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    for task in tasks:
        kind, _, arg = task.partition(":")
        if not (task in SIMPLE_TASKS or (kind in PATH_TASKS and arg)):
            raise ValueError(f"tasks: unknown task {task!r}; use {', '.join(SIMPLE_TASKS)} or "
                             f"{', '.join(k + ':...' for k in PATH_TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks: {spec!r} names a task twice")
    return tasks


def _leveled_mc(model, codec, name, items, dev, schedules, options, template) -> dict:
    """Evaluate at the schedule's current level, then let the schedule promote."""
    levels = sorted({it.level for it in items if it.level is not None})
    if not levels:
        return multiple_choice.evaluate_multiple_choice(
            model, codec, items, dev, options.k_shot, options.seed, template, options.batch_size,
            options.progress)
    schedule = difficulty.schedule_for(schedules, name, levels, options.threshold)
    level = schedule.current
    at_level = [it for it in items if it.level == level]
    result = multiple_choice.evaluate_multiple_choice(
        model, codec, at_level, dev, options.k_shot, options.seed, template, options.batch_size,
        options.progress)
    promoted = schedule.record(result["accuracy"]["rate"])
    return {**result, "level": level, "promoted": promoted, "next_level": schedule.current}


def _cloze(model, codec, documents, schedules, options) -> dict:
    schedule = difficulty.schedule_for(schedules, "cloze", sorted(cloze.LEVELS), options.threshold)
    items = cloze.cloze_items(documents, schedule.current, options.cloze_items, options.seed)
    return _leveled_mc(model, codec, "cloze", items, [], schedules, options,
                       cloze.CLOZE_TEMPLATE)


def _toxicity(model, codec, documents, options) -> dict:
    if bool(options.toxicity_lexicon) == bool(options.toxicity_classifier):
        raise ValueError("toxicity: give exactly one of --toxicity-lexicon PATH or "
                         "--toxicity-classifier DIR (dsv3 ships no word list)")
    scorer = (safety.LexiconScorer(options.toxicity_lexicon) if options.toxicity_lexicon
              else safety.ClassifierScorer(options.toxicity_classifier))
    if options.toxicity_prompts:
        from dsv3.eval.jsonl import read_jsonl
        prompts = [str(r["prompt"]) for r in read_jsonl(options.toxicity_prompts, ("prompt",),
                                                        what="toxicity prompts")]
    else:
        prompts = [" ".join(text.split()[:TOXICITY_PROMPT_WORDS]) for _, text in documents]
    return safety.evaluate_toxicity(model, codec, prompts, scorer, progress=options.progress,
                                    max_new_tokens=options.max_new_tokens, seed=options.seed)


def _bias(model, codec, options) -> dict:
    if not options.bias_spec:
        raise ValueError("bias: give --bias-spec PATH, a JSON {\"templates\": [...], "
                         "\"terms\": [...]} (each template holds {term} once)")
    templates, terms = safety.read_bias_spec(options.bias_spec)
    return safety.bias_gap(model, codec, templates, terms, batch_size=options.batch_size,
                           progress=options.progress)


def _lm_eval(model, codec, task, options) -> dict:
    from dsv3.eval.lm_eval_adapter import lm_eval_class, run_lm_eval
    lm = lm_eval_class()(model=model, codec=codec, batch_size=options.batch_size)
    return run_lm_eval(lm, [task], num_fewshot=options.k_shot, limit=options.lm_eval_limit)


def run_evaluation(model, codec, tasks: list[str], options: EvalOptions | None = None) -> dict:
    """{"tasks": {name: result}, "difficulty": {task: schedule}} for the given tasks."""
    options = options or EvalOptions()
    documents = options.documents if options.documents is not None \
        else corpus.held_out_documents()
    state = options.difficulty_state
    schedules = difficulty.load_schedules(state) if state else {}
    results = {}
    for task in tasks:
        kind, _, arg = task.partition(":")
        if task == "ppl":
            results[task] = perplexity.domain_perplexity(model, codec, documents,
                                                         batch_size=options.batch_size,
                                                         progress=options.progress)
        elif task == "cloze":
            results[task] = _cloze(model, codec, documents, schedules, options)
        elif kind == "mc":
            items, dev = multiple_choice.read_mc_file(arg)
            name = "mc:" + os.path.basename(arg)
            results[task] = _leveled_mc(model, codec, name, items, dev, schedules, options,
                                        multiple_choice.DEFAULT_TEMPLATE)
        elif kind == "gen":
            results[task] = generation.evaluate_generation(
                model, codec, generation.read_pairs(arg), options.max_new_tokens,
                seed=options.seed, progress=options.progress)
        elif task == "toxicity":
            results[task] = _toxicity(model, codec, documents, options)
        elif task == "bias":
            results[task] = _bias(model, codec, options)
        elif kind == "lm-eval":
            results[task] = _lm_eval(model, codec, arg, options)
        else:
            raise ValueError(f"tasks: unknown task {task!r}")
    if state:
        save_dir = os.path.dirname(os.path.abspath(state))
        os.makedirs(save_dir, exist_ok=True)
        difficulty.save_schedules(state, schedules)
    return {"tasks": results, "difficulty": {t: s.to_dict() for t, s in schedules.items()}}

"""The evaluation matrix: runs the named tasks on one model and gathers one results
dict (what ``eval.json`` holds and the reports render).

Task names: ``ppl`` (held-out perplexity per domain), ``cloze`` (built-in cloze at
the current difficulty level), ``mc:PATH`` (a multiple-choice jsonl; by level when its
rows carry levels), ``gen:PATH`` (BLEU/chrF on source/reference jsonl), ``toxicity``
(needs a lexicon or classifier), ``bias`` (needs a template/term spec), ``lm-eval:TASK``
(through the lm-eval adapter; needs lm-eval and network). Leveled tasks move through
their difficulty schedule, saved in ``difficulty_state`` between runs.

Two phases: ``prepare_evaluation`` reads and checks every task's options and input
files (no model needed), then ``run_prepared`` runs them. A missing ``--bias-spec``
or a bad row in the last task's file thus fails before the model is loaded, not
after the earlier tasks ran and their results were lost. Between them, ``check_fits``
checks what depends on the checkpoint (each scored choice or bias continuation, and
``--max-new-tokens`` of the generating tasks, against its ``max_seq_len``): ``dsv3 eval``
calls it once the checkpoint's config is read, before model.pt is, and ``run_prepared``
before its first task.

The model is run dropless and in eval mode for the duration (``scoring.evaluating``),
whether ``load_checkpoint`` built it or the caller passed it in mid-training: a score
must not depend on ``batch_size``. Its own settings come back afterwards, even on error.

Schedules are keyed by the task name: ``cloze``, and ``mc:PATH`` with PATH as given,
so two task files of the same name in different directories keep separate histories
(the same file given by two different paths gets two). State files written while mc
schedules were keyed ``mc:`` + the file's base name are carried over: such an entry
passes to the run's one mc task with that base name; with several none takes it, as
whose history it is cannot be told.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

from dsv3 import validate
from dsv3.eval import (cloze, corpus, difficulty, generation, multiple_choice, perplexity, safety,
                       scoring)
from dsv3.eval.difficulty import DifficultySchedule
from dsv3.eval.multiple_choice import MCItem

SIMPLE_TASKS = ("ppl", "cloze", "toxicity", "bias")
GENERATING = ("gen", "toxicity")  # the tasks --max-new-tokens applies to
PATH_TASKS = ("mc", "gen", "lm-eval")
TOXICITY_PROMPT_WORDS = 8
DOCUMENTS = ("the documents (--corpus, default CHECKPOINT/heldout.jsonl or else the embedded "
             "corpus' held-out split)")


@dataclass
class EvalOptions:
    # None: the embedded corpus' held-out split, which may overlap a model's training data
    # (corpus module docstring); ``dsv3 eval`` passes the checkpoint's heldout.jsonl.
    documents: list[tuple[str, str]] | None = None
    batch_size: int = 8
    seed: int = 0
    # None: mc tasks take no exemplars and lm-eval tasks their own default (gsm8k 5);
    # a number applies to both
    k_shot: int | None = None
    cloze_items: int = 40
    threshold: float = 0.85
    difficulty_state: str | None = None  # None: schedules live only for this run
    max_new_tokens: int = 32
    toxicity_lexicon: str | None = None
    toxicity_classifier: str | None = None
    toxicity_prompts: str | None = None  # jsonl of {"prompt"}; None: starts of the documents
    # a seeded sample of the prompts when there are more: one sampled generation each,
    # and a held-out split of thousands of documents took hours
    toxicity_prompts_max: int = 200
    bias_spec: str | None = None
    lm_eval_limit: int | None = None
    gen_stop: str = "\n"  # where gen: generations are cut ("": only eos/max_new_tokens)
    progress: bool = True


@dataclass
class LeveledTask:
    """A multiple-choice task ready to score: the items at the schedule's current level
    (all of them for a task without levels; then ``schedule`` is None)."""
    items: list[MCItem]
    dev: list[MCItem]
    k_shot: int
    template: str
    schedule: DifficultySchedule | None


@dataclass
class PreparedEvaluation:
    """Every task's inputs, read and checked, and the schedules placed at this run's
    levels. Single use: running it moves the schedules on."""
    tasks: list[str]
    options: EvalOptions
    schedules: dict[str, DifficultySchedule]
    inputs: dict[str, object]
    fits: int | None = None  # the max_seq_len check_fits passed for (None: not yet)


def parse_tasks(spec: str) -> list[str]:
    """'ppl,cloze,mc:path.jsonl' -> ['ppl', 'cloze', 'mc:path.jsonl'], each checked."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"tasks must be a comma-separated list, got {spec!r}")
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:  # "," or " , ": nothing to run, yet eval.json would be overwritten
        raise ValueError(f"tasks must name at least one task, got {spec!r}")
    for task in tasks:
        _check_task_name(task)
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks: {spec!r} names a task twice")
    return tasks


def _check_task_name(task: str) -> None:
    kind, _, arg = task.partition(":")
    if not (task in SIMPLE_TASKS or (kind in PATH_TASKS and arg)):
        raise ValueError(f"tasks: unknown task {task!r}; use {', '.join(SIMPLE_TASKS)} or "
                         f"{', '.join(k + ':...' for k in PATH_TASKS)}")


def _check_options(options: EvalOptions) -> None:
    """The numeric settings, named as the command spells them."""
    for value, option, minimum in ((options.batch_size, "--batch-size", 1),
                                   (options.cloze_items, "--cloze-items", 1),
                                   (options.max_new_tokens, "--max-new-tokens", 1),
                                   (options.toxicity_prompts_max, "--toxicity-prompts-max", 1)):
        validate.whole_number(option, value, minimum)
    if options.k_shot is not None:
        validate.whole_number("--k-shot", options.k_shot, 0)
    validate.number("--threshold", options.threshold, 0, 1, low_open=True)
    if options.lm_eval_limit is not None:  # lm-eval reads 0 as "no limit"
        validate.whole_number("--lm-eval-limit", options.lm_eval_limit, 1)


def _adopt_basename_keys(tasks: list[str], schedules: dict[str, DifficultySchedule]) -> None:
    """Carry an "mc:BASENAME" entry of an older state file over to the one mc task of
    this run with that base name (see the module docstring)."""
    owners: dict[str, list[str]] = {}
    for task in tasks:
        kind, _, arg = task.partition(":")
        if kind == "mc":
            owners.setdefault("mc:" + os.path.basename(arg), []).append(task)
    for old, named in owners.items():
        if len(named) == 1 and named[0] != old and old in schedules and named[0] not in schedules:
            schedules[named[0]] = schedules.pop(old)


def needs_documents(task: str, options: EvalOptions) -> bool:
    return task in ("ppl", "cloze") or (task == "toxicity" and not options.toxicity_prompts)


def _prepare_ppl(documents: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if not documents:
        raise ValueError(f"ppl: {DOCUMENTS} hold no documents")
    perplexity.check_documents(documents)
    return documents


def _prepare_cloze(documents, schedules, options) -> LeveledTask:
    # The schedule spans every cloze level, not just the levels of this run's items
    # (only the current one): built from those it had no level to move up to, and the
    # saved state kept that one level. schedule_for gives such a state the full list.
    schedule = difficulty.schedule_for(schedules, "cloze", sorted(cloze.LEVELS),
                                       options.threshold)
    level = schedule.current
    try:
        items = cloze.cloze_items(documents, level, options.cloze_items, options.seed)
    except ValueError as e:
        raise ValueError(f"cloze: {e}; {DOCUMENTS} hold {len(documents)}") from None
    if not items:
        raise ValueError(f"cloze: no level-{level} item could be cut from {DOCUMENTS} "
                         f"({len(documents)} documents); give more or longer ones")
    # The passage is the whole prompt: dev exemplars (--k-shot) are for mc files.
    return LeveledTask(items, [], 0, cloze.CLOZE_TEMPLATE, schedule)


def _prepare_mc(task: str, path: str, schedules, options) -> LeveledTask:
    items, dev = multiple_choice.read_mc_file(path)
    levels = sorted({it.level for it in items if it.level is not None})
    schedule = None
    if levels:
        schedule = difficulty.schedule_for(schedules, task, levels, options.threshold)
        items = [it for it in items if it.level == schedule.current]
    k_shot = options.k_shot or 0
    try:  # the few-shot draw needs enough dev rows; the prompts themselves are cheap
        multiple_choice.build_prompts(items, dev, k_shot, options.seed)
    except ValueError as e:
        raise ValueError(f"{task}: --k-shot {k_shot}: {e} (dev rows of {path} are "
                         f"those with \"split\": \"dev\")") from None
    return LeveledTask(items, dev, k_shot, multiple_choice.DEFAULT_TEMPLATE, schedule)


def _toxicity_prompts(documents, options) -> list[str]:
    if options.toxicity_prompts:
        from dsv3.eval.jsonl import read_jsonl_rows, require_str
        return [require_str(row, "prompt", where) for where, row in
                read_jsonl_rows(options.toxicity_prompts, ("prompt",), what="toxicity prompts")]
    if not documents:
        raise ValueError(f"toxicity: no prompts; give --toxicity-prompts PATH or {DOCUMENTS}")
    return [" ".join(text.split()[:TOXICITY_PROMPT_WORDS]) for _, text in documents]


def _prepare_toxicity(documents, options) -> tuple[object, list[str], int]:
    """(scorer, the prompts to generate from, how many there were to choose from)."""
    if bool(options.toxicity_lexicon) == bool(options.toxicity_classifier):
        raise ValueError("toxicity: give exactly one of --toxicity-lexicon PATH or "
                         "--toxicity-classifier DIR (dsv3 ships no word list)")
    scorer = (safety.LexiconScorer(options.toxicity_lexicon) if options.toxicity_lexicon
              else safety.ClassifierScorer(options.toxicity_classifier))
    prompts = _toxicity_prompts(documents, options)
    available = len(prompts)
    if available > options.toxicity_prompts_max:  # kept in their order
        chosen = random.Random(options.seed).sample(range(available),
                                                    options.toxicity_prompts_max)
        prompts = [prompts[i] for i in sorted(chosen)]
    return scorer, prompts, available


def _prepare_bias(options) -> tuple[list[str], list[str]]:
    if not options.bias_spec:
        raise ValueError("bias: give --bias-spec PATH, a JSON {\"templates\": [...], "
                         "\"terms\": [...]} (each template holds {term} once)")
    return safety.read_bias_spec(options.bias_spec)


def _prepare_lm_eval(task_name: str) -> str:
    from dsv3.eval.lm_eval_adapter import lm_eval_class
    lm_eval_class()  # lm-eval missing: its install hint now, not after the other tasks
    return task_name


def _prepare_task(task: str, documents, schedules, options) -> object:
    kind, _, arg = task.partition(":")
    if task == "ppl":
        return _prepare_ppl(documents)
    if task == "cloze":
        return _prepare_cloze(documents, schedules, options)
    if kind == "mc":
        return _prepare_mc(task, arg, schedules, options)
    if kind == "gen":
        generation.sacrebleu_module()  # missing: its install hint now, not after the other tasks
        return generation.read_pairs(arg, options.gen_stop)
    if task == "toxicity":
        return _prepare_toxicity(documents, options)
    if task == "bias":
        return _prepare_bias(options)
    return _prepare_lm_eval(arg)


def prepare_evaluation(tasks: list[str], options: EvalOptions | None = None
                       ) -> PreparedEvaluation:
    """Read and check what every task needs, and place the schedules, without a model."""
    options = options or EvalOptions()
    for task in tasks:
        _check_task_name(task)
    _check_options(options)
    state = options.difficulty_state
    if state:
        validate.output_path("--difficulty-state", state)
    schedules = difficulty.load_schedules(state) if state else {}
    _adopt_basename_keys(tasks, schedules)
    documents = []
    if any(needs_documents(task, options) for task in tasks):
        documents = options.documents if options.documents is not None \
            else corpus.held_out_documents()
    inputs = {task: _prepare_task(task, documents, schedules, options) for task in tasks}
    return PreparedEvaluation(list(tasks), options, schedules, inputs)


def _too_long(tokens: int, limit: int) -> str:
    return (f"has {tokens} tokens, more than the checkpoint's max_seq_len={limit}: it cannot "
            f"be scored")


def check_fits(prepared: PreparedEvaluation, codec, limit: int | None) -> None:
    """Every continuation the tasks will score (a choice, with its leading space; the
    text after a bias template's {term}) fits ``limit`` tokens, named by file and line,
    and so does ``--max-new-tokens``: ``score_continuations`` and ``generate`` would
    refuse them only once the earlier tasks had run. A long prompt is no error (it loses
    its start, and the results count it)."""
    if limit is None or prepared.fits == limit:
        return
    generating = [t for t in prepared.tasks if t.partition(":")[0] in GENERATING]
    if generating and prepared.options.max_new_tokens > limit:
        raise ValueError(f"--max-new-tokens {prepared.options.max_new_tokens} is more than the "
                         f"checkpoint's max_seq_len={limit} can generate (at most {limit}, "
                         f"after a one-token prompt), for {', '.join(generating)}")
    for task in prepared.tasks:
        inputs = prepared.inputs[task]
        if isinstance(inputs, LeveledTask):
            for n, item in enumerate(inputs.items):
                for k, choice in enumerate(item.choices):
                    tokens = len(codec.encode(" " + choice))
                    if tokens > limit:
                        where = item.where or f"{task}: item {n}"
                        raise ValueError(f"{where}: choice {k} {_too_long(tokens, limit)}")
        elif task == "bias":
            templates, terms = inputs
            for i, (_, after) in enumerate(safety.bias_parts(templates, terms)):
                tokens = len(codec.encode(after))
                if tokens > limit:
                    raise ValueError(f"bias spec: {prepared.options.bias_spec}: templates[{i}]: "
                                     f"the text after {{term}} {_too_long(tokens, limit)}")
    prepared.fits = limit


def _run_leveled(model, codec, task: LeveledTask, options: EvalOptions) -> dict:
    """Evaluate at the schedule's current level, then let the schedule promote."""
    result = multiple_choice.evaluate_multiple_choice(
        model, codec, task.items, task.dev, task.k_shot, options.seed, task.template,
        options.batch_size, options.progress)
    if task.schedule is None:
        return result
    level = task.schedule.current
    promoted = task.schedule.record(result["accuracy"]["rate"])
    return {**result, "level": level, "promoted": promoted, "next_level": task.schedule.current}


def _lm_eval(model, codec, task, options) -> dict:
    from dsv3.eval.lm_eval_adapter import lm_eval_class, run_lm_eval
    lm = lm_eval_class()(model=model, codec=codec, batch_size=options.batch_size)
    result = run_lm_eval(lm, [task], num_fewshot=options.k_shot, limit=options.lm_eval_limit)
    # Beside lm-eval's per-task metrics, what its generations lost to the context
    # (report.LM_EVAL_COUNTS: not a task of lm-eval's).
    return {**result, "generations": lm.generations, "truncated_prompts": lm.truncated_prompts,
            "capped_requests": lm.capped_requests, "max_gen_toks": lm.max_gen_toks}


def _run_task(model, codec, task: str, inputs, options: EvalOptions) -> dict:
    kind = task.partition(":")[0]
    if task == "ppl":
        return perplexity.domain_perplexity(model, codec, inputs, batch_size=options.batch_size,
                                            progress=options.progress)
    if task == "cloze" or kind == "mc":
        return _run_leveled(model, codec, inputs, options)
    if kind == "gen":
        return generation.evaluate_generation(
            model, codec, inputs, options.max_new_tokens, seed=options.seed,
            stop=(options.gen_stop,) if options.gen_stop else (), progress=options.progress)
    if task == "toxicity":
        scorer, prompts, available = inputs
        return {**safety.evaluate_toxicity(model, codec, prompts, scorer,
                                           progress=options.progress,
                                           max_new_tokens=options.max_new_tokens,
                                           seed=options.seed),
                "prompts_available": available}
    if task == "bias":
        templates, terms = inputs
        return safety.bias_gap(model, codec, templates, terms, batch_size=options.batch_size,
                               progress=options.progress)
    return _lm_eval(model, codec, inputs, options)


def run_prepared(model, codec, prepared: PreparedEvaluation, save_state: bool = True) -> dict:
    """{"tasks": {name: result}, "difficulty": {task: schedule}}; saves the schedules
    (save_difficulty) unless ``save_state`` is False, for a caller that saves them once
    the results are written."""
    options, schedules = prepared.options, prepared.schedules
    check_fits(prepared, codec, scoring.context_limit(model))
    # The factor the model was built with (evaluating() leaves model.config alone).
    moe = getattr(getattr(model, "config", None), "moe", None)
    with scoring.evaluating(model):
        results = {task: _run_task(model, codec, task, prepared.inputs[task], options)
                   for task in prepared.tasks}
    if save_state:
        save_difficulty(prepared)
    out = {"tasks": results, "difficulty": {t: s.to_dict() for t, s in schedules.items()}}
    if moe is not None:  # ``dsv3 eval`` puts the checkpoint's own factor here instead
        out["moe"] = {"evaluated": "dropless", "trained_capacity_factor": moe.capacity_factor}
    return out


def save_difficulty(prepared: PreparedEvaluation) -> None:
    """The leveled tasks' schedules, as the run left them, into the difficulty state
    file (when the options name one)."""
    state = prepared.options.difficulty_state
    if state:
        os.makedirs(os.path.dirname(os.path.abspath(state)), exist_ok=True)
        difficulty.save_schedules(state, prepared.schedules)


def run_evaluation(model, codec, tasks: list[str], options: EvalOptions | None = None) -> dict:
    """{"tasks": {name: result}, "difficulty": {task: schedule}} for the given tasks."""
    return run_prepared(model, codec, prepare_evaluation(tasks, options))

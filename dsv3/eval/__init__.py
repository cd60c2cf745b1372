"""dsv3.eval: the evaluation suite, above the model in the package's layers.

    from dsv3.eval import load_checkpoint, run_evaluation, EvalOptions
    model, codec = load_checkpoint("runs/tiny")
    results = run_evaluation(model, codec, ["ppl", "cloze"], EvalOptions())

One file per job: ``scoring`` (batched log-probs, the primitive), ``perplexity``,
``decoding`` (KV-cache generation), ``generation`` (BLEU/chrF), ``multiple_choice``,
``safety`` (toxicity, bias gap), ``difficulty`` (level schedules), ``corpus`` and
``cloze`` (built-in tasks), ``lm_eval_adapter``, ``runner`` (the task matrix),
``report`` (markdown/HTML/JSON), ``cli`` (``dsv3 eval`` / ``python -m dsv3.eval``).
"""
from dsv3.eval.decoding import Generation, generate
from dsv3.eval.difficulty import DifficultySchedule
from dsv3.eval.generation import corpus_scores, evaluate_generation
from dsv3.eval.loading import TextCodec, load_checkpoint
from dsv3.eval.multiple_choice import MCItem, evaluate_multiple_choice, read_mc_file
from dsv3.eval.perplexity import domain_perplexity
from dsv3.eval.report import html_fragment, markdown_table, write_results
from dsv3.eval.runner import (EvalOptions, parse_tasks, prepare_evaluation, run_evaluation,
                              run_prepared)
from dsv3.eval.safety import ClassifierScorer, LexiconScorer, bias_gap, evaluate_toxicity

__all__ = ["ClassifierScorer", "DifficultySchedule", "EvalOptions", "Generation",
           "LexiconScorer", "MCItem", "TextCodec", "bias_gap", "corpus_scores",
           "domain_perplexity", "evaluate_generation", "evaluate_multiple_choice",
           "evaluate_toxicity", "generate", "html_fragment", "load_checkpoint", "markdown_table",
           "parse_tasks", "prepare_evaluation", "read_mc_file", "run_evaluation", "run_prepared",
           "write_results"]

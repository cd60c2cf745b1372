"""``dsv3 eval``: evaluate a checkpoint directory on a list of tasks and write
``eval.json`` + ``eval.md`` into ``--out``.

``register(subparsers)`` adds the subcommand to the ``dsv3`` command's parser;
``python -m dsv3.eval`` runs the same arguments on their own (``main``).
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap

from dsv3 import validate
from dsv3.user_errors import closed_pipe, interrupted, is_bad_input, stdout_closed

DESCRIPTION = ("Evaluate a dsv3 checkpoint (config.json, model.pt, tokenizer.json): held-out "
               "perplexity, cloze and multiple choice with dynamic difficulty, BLEU/chrF, "
               "toxicity and bias; writes eval.json and eval.md.")
# The task files' formats, which --help would otherwise leave to the module docstrings.
FILE_FORMATS = """task files (jsonl, one object per line):
  mc:PATH   {"question": str, "choices": [str, ...], "answer": index | letter | choice text,
             "level": int (optional, on every test row or none),
             "split": "test" (default, scored) | "dev" (few-shot pool)}
  gen:PATH  {"source": str, "reference": str}  (BLEU and chrF of the continuation)
  --corpus  {"domain": str, "text": str}
  --toxicity-prompts  {"prompt": str}"""


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def _escaped(text: str) -> str:
    """A shell argument with \\n, \\t and \\\\ read as the characters they name (a
    newline is awkward to type); any other backslash is an error, not a guess."""
    out, chars = [], iter(text)
    for c in chars:
        if c == "\\":
            nxt = next(chars, "")
            if nxt not in _ESCAPES:
                raise ValueError(f"unknown escape '\\{nxt}' in {text!r}: use \\n, \\t or \\\\")
            c = _ESCAPES[nxt]
        out.append(c)
    return "".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--tasks", default="ppl,cloze",
                        help="comma-separated: ppl, cloze, mc:PATH, gen:PATH, toxicity, bias, "
                             "lm-eval:TASK (default: ppl,cloze)")
    parser.add_argument("--out", required=True, help="directory for eval.json and eval.md")
    parser.add_argument("--corpus", help="jsonl of {domain, text} held-out documents for ppl, "
                                         "cloze and toxicity prompts (default: CHECKPOINT/"
                                         "heldout.jsonl, the documents the training run held "
                                         "out; without one, the embedded corpus' held-out "
                                         "split, which may overlap the training data: a "
                                         "warning says so)")
    parser.add_argument("--difficulty-state", help="JSON file keeping the difficulty levels "
                                                   "between runs (default: OUT/difficulty.json)")
    parser.add_argument("--threshold", type=float, default=0.85,
                        help="accuracy that promotes to the next level (default 0.85)")
    parser.add_argument("--cloze-items", type=int, default=40,
                        help="cloze items drawn per evaluation (fewer when the documents run "
                             "out; default 40)")
    parser.add_argument("--k-shot", type=int, default=None,
                        help="few-shot exemplars: for mc tasks from the file's \"split\": "
                             "\"dev\" rows (default 0), for lm-eval tasks lm-eval's "
                             "num_fewshot (default: each task's own, e.g. 5 for gsm8k)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="sequences per forward when scoring (speed and memory only: "
                             "the model is evaluated dropless, so results do not depend on "
                             "it; default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="most tokens generated per prompt for gen and toxicity, at "
                             "most the checkpoint's max_seq_len; a prompt too long to leave "
                             "them room loses its start, and the results count it "
                             "(default 32)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the cloze items, few-shot exemplars and sampled "
                             "generations (default 0)")
    parser.add_argument("--device", default="cpu",
                        help="device to evaluate on: cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--toxicity-lexicon", help="word/phrase list, one per line")
    parser.add_argument("--toxicity-classifier", help="local HF text-classification model dir")
    parser.add_argument("--toxicity-prompts", help="jsonl of {prompt} (default: document starts)")
    parser.add_argument("--toxicity-prompts-max", type=int, default=200,
                        help="most prompts toxicity generates from, a seeded sample (--seed) "
                             "when there are more; one generation each (default 200)")
    parser.add_argument("--gen-stop", type=validate.option(_escaped), default="\n",
                        help="text at which gen: generations stop and are cut, with \\n "
                             "and \\t escapes; '' for none (end of text or "
                             "--max-new-tokens). A reference may not hold it "
                             "(default \\n: one-line answers)")
    parser.add_argument("--bias-spec", help='JSON {"templates": [...], "terms": [...]}')
    parser.add_argument("--lm-eval-limit", type=int,
                        help="examples per lm-eval task, >= 1 (default: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint", description=textwrap.fill(DESCRIPTION, 79),
                                   epilog=FILE_FORMATS,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def warn(message: str) -> None:
    print(f"dsv3 eval: warning: {message}", file=sys.stderr)


def _corpus(args: argparse.Namespace) -> str | None:
    """The documents file: --corpus, else the checkpoint's own held-out documents (the
    trainer writes them; the embedded corpus' split is not held out from its training
    text). None: the embedded split."""
    if args.corpus:
        return args.corpus
    heldout = os.path.join(args.checkpoint, "heldout.jsonl")
    # A run that held out nothing (val_fraction or the data's [heldout] fraction 0)
    # exports an empty file:
    # that is a checkpoint without held-out documents, not a corpus file with no rows.
    return heldout if os.path.isfile(heldout) and _holds_a_row(heldout) else None


def _holds_a_row(path: str) -> bool:
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def run(args: argparse.Namespace) -> int:
    """Every input is checked before the checkpoint's weights are loaded (``dsv3 eval``
    and ``python -m dsv3.eval`` both come here): files and options first, then, with
    the checkpoint's config, what must fit its context. Then the tasks run and the
    results are written."""
    # --device by the rule dsv3 train uses: a device this machine lacks is one error
    # line now, not torch's "no NVIDIA driver" traceback from inside the load.
    from dsv3.devices import check_device
    from dsv3.eval.corpus import read_documents
    from dsv3.eval.loading import load_checkpoint, read_checkpoint
    from dsv3.eval.report import result_warnings, write_results
    from dsv3.eval.runner import (EvalOptions, check_fits, needs_documents,
                                  parse_tasks, prepare_evaluation, run_prepared,
                                  save_difficulty)
    from dsv3.validate import output_path

    tasks = parse_tasks(args.tasks)
    check_device(args.device)
    # eval.json is written last: a bad --out must not cost the whole evaluation.
    output_path("--out", args.out, directory=True)
    options = EvalOptions(
        batch_size=args.batch_size, seed=args.seed, k_shot=args.k_shot,
        cloze_items=args.cloze_items, threshold=args.threshold,
        difficulty_state=args.difficulty_state or os.path.join(args.out, "difficulty.json"),
        max_new_tokens=args.max_new_tokens, toxicity_lexicon=args.toxicity_lexicon,
        toxicity_classifier=args.toxicity_classifier, toxicity_prompts=args.toxicity_prompts,
        toxicity_prompts_max=args.toxicity_prompts_max,
        bias_spec=args.bias_spec, lm_eval_limit=args.lm_eval_limit, gen_stop=args.gen_stop,
        progress=not args.no_progress)
    # The documents are read only for a task that scores them: a damaged heldout.jsonl
    # must not stop an evaluation of mc files alone.
    uses_documents = any(needs_documents(task, options) for task in tasks)
    corpus = _corpus(args) if uses_documents else None
    if corpus:
        options.documents = read_documents(
            corpus, "--corpus" if args.corpus else "--checkpoint's heldout.jsonl")
    elif args.corpus:  # given on purpose, so say it was not read
        warn(f"--corpus {args.corpus} is not used: none of the tasks ({', '.join(tasks)}) "
             f"reads documents")
    # Every task's options and files before the model: a missing --bias-spec must not
    # surface only after ppl ran, its results lost.
    prepared = prepare_evaluation(tasks, options)
    config, codec = read_checkpoint(args.checkpoint, "--checkpoint")
    # A choice longer than the context fails here, not after ppl ran: results kept.
    check_fits(prepared, codec, config.max_seq_len)
    if uses_documents and corpus is None:
        heldout = os.path.join(args.checkpoint, "heldout.jsonl")
        held = f"an empty {heldout} (its run held no documents out)" if os.path.isfile(
            heldout) else f"no {heldout}"
        warn(f"no --corpus and {held}: using the "
             f"embedded corpus' held-out split, which may overlap the model's training data "
             f"(perplexity and cloze then flatter it)")
    model, codec = load_checkpoint(args.checkpoint, args.device, "--checkpoint")
    # The schedules are saved once the results are written: an evaluation whose results
    # could not be written (eval.md a directory, say) must not move a task's level.
    results = run_prepared(model, codec, prepared, save_state=False)
    results["checkpoint"] = os.path.abspath(args.checkpoint)
    if uses_documents:
        results["corpus"] = (os.path.abspath(corpus) if corpus else
                             "embedded held-out split (may overlap the training data)")
    if config.moe is not None:  # see dsv3.eval.loading: evaluated without token dropping;
        # the checkpoint's factor, not the loaded model's (built dropless)
        results["moe"] = {"evaluated": "dropless",
                          "trained_capacity_factor": config.moe.capacity_factor}
    for message in result_warnings(results):
        warn(message)
    json_path, md_path = write_results(args.out, results)
    save_difficulty(prepared)
    with open(md_path, encoding="utf-8") as f:
        print(f.read(), end="")
    print(f"wrote {json_path} and {md_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv3.eval",
                                     description=textwrap.fill(DESCRIPTION, 79),
                                     epilog=FILE_FORMATS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        status = run(args)
        sys.stdout.flush()  # a closed pipe shows here, handled below, not at exit
        return status
    except KeyboardInterrupt:  # eval.json and difficulty.json are each old or whole
        return interrupted("dsv3 eval")
    except BrokenPipeError:
        if not stdout_closed():  # another pipe or socket broke: a real failure
            raise
        return closed_pipe()
    except Exception as e:
        if not is_bad_input(e):
            raise
        print(f"dsv3 eval: error: {e}", file=sys.stderr)
        return 2

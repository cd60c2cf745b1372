"""Results as tables: one flat row list (task, metric, value, 95% interval, n) rendered
as markdown (``eval.md``) and as an HTML fragment the trainer's report can embed (the
table, the warnings, and the difficulty history of each leveled task this evaluation
ran; the state file may hold others, from earlier runs). ``eval.json`` keeps
everything, with NaN written as null so any JSON reader takes it.

Results may come back from a file (``dsv3 report --eval``), hand-edited or cut short:
a missing or malformed field is a ValueError naming the task and the field, not a
KeyError from deep inside the rendering.
"""
from __future__ import annotations

import contextlib
import html
import json
import math
import os

from dsv3.whole_files import write_text_whole


def _rate_rows(task: str, result: dict, label: str = "") -> list[dict]:
    rows = []
    for key, metric in (("accuracy", "accuracy"), ("accuracy_unnormalized",
                                                   "accuracy (unnormalized)")):
        if key in result:
            rows.append({"task": task, "metric": metric + label, "value": result[key]["rate"],
                         "ci95": result[key]["ci95"], "n": result[key]["n"]})
    if "chance" in result:
        rows.append({"task": task, "metric": "chance" + label, "value": result["chance"],
                     "ci95": None, "n": None})
    return rows


@contextlib.contextmanager
def _fields_of(label: str):
    """A field missing or of the wrong kind under ``label`` is named as such."""
    try:
        yield
    except KeyError as e:
        raise ValueError(f"{label} lacks the field {e.args[0]!r}") from None
    except (TypeError, AttributeError, IndexError, ValueError) as e:
        raise ValueError(f"{label} is malformed ({e})") from None


def summary_rows(results: dict) -> list[dict]:
    """One row per metric, its value, interval and n already formatted as text."""
    # the runner's task names (imported here: the runner brings the model code along)
    from dsv3.eval.runner import PATH_TASKS, SIMPLE_TASKS
    rows = []
    for task, result in results["tasks"].items():
        kind, _, arg = str(task).partition(":")
        if not (task in SIMPLE_TASKS or (kind in PATH_TASKS and arg)):
            # from a newer dsv3, or hand-edited: its results were left out of the table
            known = SIMPLE_TASKS + tuple(f"{k}:NAME" for k in PATH_TASKS)
            raise ValueError(f"tasks[{task!r}] is not a task this dsv3 reports (known: "
                             f"{', '.join(known)})")
        with _fields_of(f"tasks[{task!r}]"):
            rows += [{**row, "value": _value(row["value"]), "ci95": _ci(row["ci95"]),
                      "n": _fmt(row["n"])} for row in _task_rows(task, result)]
    return rows


# What runner adds to an lm-eval task's results beside lm-eval's own (subtask -> metrics).
LM_EVAL_COUNTS = ("generations", "truncated_prompts", "capped_requests", "max_gen_toks")


def _task_rows(task: str, result: dict) -> list[dict]:
    rows = []
    kind = task.partition(":")[0]
    if task == "ppl":
        for domain, r in result.items():
            # n counts what the metric averages over: tokens, then bytes
            rows.append({"task": task, "metric": f"perplexity [{domain}] (n: tokens)",
                         "value": r["perplexity"], "ci95": None, "n": r["tokens"]})
            rows.append({"task": task, "metric": f"bits/byte [{domain}] (n: bytes)",
                         "value": r["bits_per_byte"], "ci95": None, "n": r["bytes"]})
    elif task == "cloze" or kind == "mc":
        label = f" (level {result['level']})" if "level" in result else ""
        rows += _rate_rows(task, result, label)
        if "level" in result:
            rows.append({"task": task, "metric": "next level", "value": result["next_level"],
                         "ci95": None, "n": None})
    elif kind == "gen":
        rows += [{"task": task, "metric": m, "value": result[m], "ci95": None,
                  "n": result["n"]} for m in ("bleu", "chrf")]
    elif task == "toxicity":
        rows.append({"task": task, "metric": "toxic rate", "value": result["rate"],
                     "ci95": result["ci95"], "n": result["n"]})
    elif task == "bias":
        rows.append({"task": task, "metric": f"gap ({result['max_term']} - "
                     f"{result['min_term']})", "value": result["gap"], "ci95": None,
                     "n": result["templates"]})
        rows += [{"task": task, "metric": f"score [{term}]", "value": value, "ci95": None,
                  "n": result["templates"]} for term, value in result["per_term"].items()]
    elif kind == "lm-eval":
        for sub, metrics in result.items():
            if sub in LM_EVAL_COUNTS:  # reported as a warning, not a score
                continue
            rows += [{"task": f"{task} {sub}", "metric": m, "value": v, "ci95": None,
                      "n": None} for m, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return rows


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _value(value) -> str:
    """A metric's value; null is a NaN read back from eval.json (which writes NaN as
    null), shown as eval.md shows the NaN itself, not as an empty cell."""
    return "nan" if value is None else _fmt(value)


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _truncation_warning(task: str, result: dict) -> str:
    """Scored prompts (mc, cloze: ``accuracy``) lose their start to fit the context;
    generated ones, to leave room in it for the tokens to generate."""
    cut = result["truncated_prompts"]
    if task == "cloze":  # no exemplars and no questions of the user's to shorten
        return (f"{task}: {cut} of {result['accuracy']['n']} passages were longer than the "
                f"model's context and lost their start (their choices are still scored "
                f"whole): a model with a longer max_seq_len would see them entire")
    if "accuracy" in result:
        return (f"{task}: {cut} of {result['accuracy']['n']} prompts were longer than the "
                f"model's context and lost their start (few-shot exemplars first): lower "
                f"--k-shot or shorten the questions")
    total = result["generations"] if "generations" in result else result["n"]
    budget = ("the task's max_gen_toks" if task.startswith("lm-eval:")
              else "--max-new-tokens")
    return (f"{task}: {cut} of {total} prompts left the model's context too little room "
            f"for the tokens to generate and lost their start: lower {budget} or shorten "
            f"the prompts")


def result_warnings(results: dict) -> list[str]:
    """What a task did that its numbers do not show: prompts cut to fit the context,
    lm-eval requests whose token budget was capped (``dsv3 eval`` prints these on
    stderr too)."""
    messages = []
    for task, result in results["tasks"].items():
        if task == "ppl":  # keyed by domain: a domain named like a count is no count
            continue
        with _fields_of(f"tasks[{task!r}]"):
            if result.get("truncated_prompts"):
                messages.append(_truncation_warning(task, result))
            if result.get("capped_requests"):
                messages.append(
                    f"{task}: {result['capped_requests']} of {result['generations']} requests "
                    f"asked for more new tokens (the task's max_gen_toks) than the model's "
                    f"context holds and got {result['max_gen_toks']} instead")
            # Results written before generation cut prompts to leave room (a long
            # source then got one token) count those generations instead.
            if result.get("stopped_at_context"):
                messages.append(
                    f"{task}: {result['stopped_at_context']} of {result['n']} generations "
                    f"were cut short by the model's context (a source of max_seq_len tokens "
                    f"or more gets one token)")
    return messages


def _notes(results: dict) -> list[str]:
    """Where the documents came from and how an MoE was run, when the results say."""
    notes = []
    if "corpus" in results:
        notes.append(f"documents: {results['corpus']}")
    with _fields_of("moe"):
        trained = results["moe"]["trained_capacity_factor"] if "moe" in results else None
    if trained is not None:
        notes.append(f"MoE evaluated dropless (trained with capacity_factor={trained})")
    return notes


def _histories(results: dict) -> list[tuple[str, dict, list[tuple[str, ...]]]]:
    """(task, schedule, formatted history rows) of the leveled tasks this evaluation ran."""
    out = []
    schedules = results.get("difficulty", {})
    if not isinstance(schedules, dict):
        raise ValueError(f"difficulty must be an object of task -> schedule, got "
                         f"{type(schedules).__name__}")
    for task, schedule in schedules.items():
        if task not in results["tasks"]:
            continue  # a schedule of the state file that this run did not move
        with _fields_of(f"difficulty[{task!r}]"):
            rows = [(str(h["evaluation"]), str(h["level"]), f"{h['accuracy']:.3f}",
                     "yes" if h["promoted"] else "no") for h in schedule["history"]]
            out.append((task, {"threshold": f"{schedule['threshold']:.0%}",
                               "current": schedule["current"]}, rows))
    return out


def _md_row(cells) -> str:
    """A markdown table row; a ``|`` inside a cell (a domain ``en|news``, a file name) is
    escaped, or it would end the cell and shift every column after it, and a line break
    becomes ``<br>``, or it would end the row (and the table with it)."""
    return "| " + " | ".join(_md_cell(str(cell)) for cell in cells) + " |"


def _md_cell(text: str) -> str:
    for line_break in ("\r\n", "\n", "\r"):
        text = text.replace(line_break, "<br>")
    return text.replace("|", "\\|")


def markdown_table(results: dict) -> str:
    lines = ["| task | metric | value | 95% CI | n |", "|---|---|---|---|---|"]
    lines += [_md_row(r[k] for k in ("task", "metric", "value", "ci95", "n"))
              for r in summary_rows(results)]
    for title, items in (("Warnings", result_warnings(results)), ("Notes", _notes(results))):
        if items:
            lines += ["", f"{title}:", ""] + [f"- {item}" for item in items]
    for task, schedule, history in _histories(results):
        lines += ["", f"Difficulty history of {task} (threshold {schedule['threshold']}, "
                      f"now level {schedule['current']}):", "",
                  "| evaluation | level | accuracy | promoted |", "|---|---|---|---|"]
        lines += [_md_row(row) for row in history]
    return "\n".join(lines) + "\n"


def html_fragment(results: dict) -> str:
    """A <section> with the results table, the warnings and notes, and the difficulty
    histories (no <html>/<head>: the page that includes it brings its own styles)."""
    e = html.escape
    out = ['<section class="dsv3-eval">', "<h2>Evaluation</h2>",
           "<table><thead><tr><th>task</th><th>metric</th><th>value</th><th>95% CI</th>"
           "<th>n</th></tr></thead><tbody>"]
    out += ["<tr>" + "".join(f"<td>{e(r[k])}</td>" for k in ("task", "metric", "value", "ci95",
                                                               "n")) + "</tr>"
            for r in summary_rows(results)]
    out.append("</tbody></table>")
    for title, items in (("Warnings", result_warnings(results)), ("Notes", _notes(results))):
        if items:
            out += [f"<p>{title}:</p><ul>"] + [f"<li>{e(item)}</li>" for item in items] + ["</ul>"]
    for task, schedule, history in _histories(results):
        out += [f"<h3>Difficulty: {e(task)} (threshold {schedule['threshold']}, now level "
                f"{e(str(schedule['current']))})</h3>",
                "<table><thead><tr><th>evaluation</th><th>level</th><th>accuracy</th>"
                "<th>promoted</th></tr></thead><tbody>"]
        out += ["<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>"
                for row in history]
        out.append("</tbody></table>")
    out.append("</section>")
    return "\n".join(out) + "\n"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results(out_dir: str, results: dict) -> tuple[str, str]:
    """Writes eval.json and eval.md into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, "eval.json"), os.path.join(out_dir, "eval.md")
    # Both rendered before either file is opened: results that cannot be rendered leave
    # the files of the last evaluation as they were, not a new eval.json beside an
    # emptied eval.md.
    json_text = json.dumps(_json_safe(results), indent=2, allow_nan=False)
    table = markdown_table(results)
    # Each file whole or not at all: a kill mid-write leaves the old file, never a cut
    # eval.json that `dsv3 report` would fail on. eval.json, the results, goes first;
    # if its table then cannot be written, the old table goes too rather than stay
    # beside results it does not show.
    write_text_whole(json_path, json_text)
    try:
        write_text_whole(md_path, table)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(md_path)
        raise
    return json_path, md_path

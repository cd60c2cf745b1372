"""Results as tables: one flat row list (task, metric, value, 95% interval, n) rendered
as markdown (``eval.md``) and as an HTML fragment the trainer's report can embed (the
table plus each leveled task's difficulty history). ``eval.json`` keeps everything,
with NaN written as null so any JSON reader takes it.
"""
from __future__ import annotations

import html
import json
import math
import os


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


def summary_rows(results: dict) -> list[dict]:
    rows = []
    for task, result in results["tasks"].items():
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


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def markdown_table(results: dict) -> str:
    lines = ["| task | metric | value | 95% CI | n |", "|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['metric']} | {_fmt(r['value'])} | {_ci(r['ci95'])} | "
              f"{_fmt(r['n'])} |" for r in summary_rows(results)]
    for task, schedule in results.get("difficulty", {}).items():
        lines += ["", f"Difficulty history of {task} (threshold {schedule['threshold']:.0%}, "
                      f"now level {schedule['current']}):", "",
                  "| evaluation | level | accuracy | promoted |", "|---|---|---|---|"]
        lines += [f"| {h['evaluation']} | {h['level']} | {h['accuracy']:.3f} | "
                  f"{'yes' if h['promoted'] else 'no'} |" for h in schedule["history"]]
    return "\n".join(lines) + "\n"


def html_fragment(results: dict) -> str:
    """A <section> with the results table and the difficulty histories (no <html>/<head>:
    the page that includes it brings its own styles)."""
    e = html.escape
    out = ['<section class="dsv3-eval">', "<h2>Evaluation</h2>",
           "<table><thead><tr><th>task</th><th>metric</th><th>value</th><th>95% CI</th>"
           "<th>n</th></tr></thead><tbody>"]
    out += [f"<tr><td>{e(r['task'])}</td><td>{e(r['metric'])}</td><td>{e(_fmt(r['value']))}"
            f"</td><td>{e(_ci(r['ci95']))}</td><td>{e(_fmt(r['n']))}</td></tr>"
            for r in summary_rows(results)]
    out.append("</tbody></table>")
    for task, schedule in results.get("difficulty", {}).items():
        out += [f"<h3>Difficulty: {e(task)} (threshold {schedule['threshold']:.0%}, now level "
                f"{schedule['current']})</h3>",
                "<table><thead><tr><th>evaluation</th><th>level</th><th>accuracy</th>"
                "<th>promoted</th></tr></thead><tbody>"]
        out += [f"<tr><td>{h['evaluation']}</td><td>{h['level']}</td><td>{h['accuracy']:.3f}</td>"
                f"<td>{'yes' if h['promoted'] else 'no'}</td></tr>" for h in schedule["history"]]
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
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(_json_safe(results), f, indent=2, allow_nan=False)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown_table(results))
    return json_path, md_path

"""The end-of-run report: one static HTML page (plots embedded as PNG data URIs,
so the file stands alone) with the training curves from ``metrics.jsonl`` and a
heat map of expert utilization (layer x expert share of routed tokens).
Other parts (the evaluation) can add their own HTML sections."""
import base64
import html
import io
import json
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from dsv3.whole_files import write_text_whole  # noqa: E402  (each file whole or not at all)

CURVES = [  # (title, metric keys)
    # The DPO loss (~ln 2) lives on another scale than the LM loss: its own panel.
    ("LM loss", ["loss"]),
    ("DPO loss", ["dpo/loss"]),
    ("learning rate", ["lr"]),
    ("gradient norm", ["grad_norm"]),
    ("tokens/s", ["tokens_per_s"]),
    ("MFU", ["mfu"]),
    ("MoE balance (max/mean load, CV)", ["moe/load_max_over_mean", "moe/load_cv"]),
    ("router entropy", ["moe/router_entropy"]),
    ("DPO reward margin / accuracy", ["dpo/reward_margin", "dpo/reward_accuracy"]),
]


def read_metrics(path: Path, warn: Callable[[str], None] | None = None) -> list[dict]:
    """metrics.jsonl's records, each a JSON object with a whole-number "step" (the
    curves' x axis); a bad line is a ValueError naming the file and line. But for the
    last one: the logger appends a line per record, so a crash mid-write leaves only
    the last line cut short (the trainer's own reader, dsv3.train.metrics, leaves it
    out on resume): it is left out here too, and ``warn`` told."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline ending the last line starts no line
    records = []
    for number, line in enumerate(lines, 1):
        where = f"{path}:{number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:  # Python's message names neither file nor line
            raise ValueError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            if number < len(lines):
                raise ValueError(f"{where} is not JSON ({e.msg})") from None
            if warn is not None:
                warn(f"{where}: the last line is cut short (a crash mid-write?) and left out "
                     f"({e.msg})")
            continue
        if not isinstance(record, dict):
            raise ValueError(f"{where} must be a JSON object, got {type(record).__name__}")
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"{where} lacks a whole-number 'step' (got {step!r})")
        records.append(record)
    return records


def read_summary(path: Path) -> dict | None:
    """summary.json (the trainer's summary of the run) as an object; None without one.
    The trainer writes it whole, so a damaged one was damaged since: a ValueError
    naming it."""
    if not path.is_file():
        return None
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 (byte {e.start + 1})") from None
    if not text.strip():
        raise ValueError(f"{path} is empty")
    try:
        summary = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(summary).__name__}")
    return summary


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def curves_png(records: list[dict]) -> str | None:
    panels = [(title, keys) for title, keys in CURVES if any(k in r for r in records for k in keys)]
    if not panels:  # records of metrics no panel plots: no figure (matplotlib refuses 0 rows)
        return None
    figure, axes = plt.subplots(-(-len(panels) // 2), 2, figsize=(11, 2.6 * -(-len(panels) // 2)),
                                squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    figure.tight_layout()
    return _png(figure)


def heatmap_png(load_counts) -> str:
    """Share of each layer's routed copies per expert over the whole run."""
    rows = [(counts / max(float(counts.sum()), 1.0)).tolist() for counts in load_counts]
    figure, ax = plt.subplots(figsize=(max(4, 0.5 * len(rows[0]) + 2), 0.6 * len(rows) + 1.5))
    image = ax.imshow(rows, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(rows)))  # whole layers, not matplotlib's -0.5, 0.0, 0.5 ...
    ax.set_title("expert utilization (share of routed tokens)")
    figure.colorbar(image, ax=ax)
    return _png(figure)


def write_report(out_dir: Path, load_counts=None, summary: dict | None = None,
                 sections: list[str] = (), *, fallback_summary: dict | None = None,
                 warn: Callable[[str], None] | None = None) -> Path:
    """``out_dir/report.html`` from ``out_dir/metrics.jsonl``; ``sections`` are extra
    HTML fragments (e.g. the evaluation table). The trainer's ``summary`` is kept
    beside it in summary.json, so that `dsv3 report` rebuilding the page (to add the
    evaluation) shows the trainer's summary, not only what a checkpoint holds; without
    one given, that file's is shown, and without that file, ``fallback_summary`` (what
    `dsv3 report` reads off the checkpoint), which is shown only, never saved: a
    stand-in summary.json would be shown as the run's by every later report, stale once
    the run went on, and would tell `dsv3 train` the run was reported, so that it never
    wrote the real one. ``warn`` hears of a metrics line left out (``read_metrics``)."""

    out_dir = Path(out_dir)
    summary_path = out_dir / "summary.json"
    # Both files read before anything is written: a damaged one fails with nothing changed.
    records = read_metrics(out_dir / "metrics.jsonl", warn)
    if summary is not None:
        text = json.dumps(summary, indent=2)
        write_text_whole(summary_path, text)
    else:
        summary = read_summary(summary_path)
        if summary is None:
            summary = fallback_summary
    parts = ["<!doctype html><meta charset='utf-8'><title>dsv3 training report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}</style>",
             "<h1>dsv3 training report</h1>"]
    if summary:
        parts.append("<table>" + "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in summary.items()) + "</table>")
    curves = curves_png(records) if records else None
    if curves:
        parts.append(f"<h2>Curves</h2><img src='{curves}' alt='training curves'>")
    if load_counts:
        parts.append(f"<h2>Experts</h2><img src='{heatmap_png(load_counts)}' alt='expert heat map'>")
    parts.extend(sections)
    path = out_dir / "report.html"
    write_text_whole(path, "\n".join(parts))
    return path


def reported(out_dir: Path) -> bool:
    """Whether the run's report is there (summary.json and report.html, each written
    whole or not at all): a finished run started again writes it only if not."""
    return all((Path(out_dir) / name).is_file() for name in ("summary.json", "report.html"))

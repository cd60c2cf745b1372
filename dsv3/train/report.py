"""The end-of-run report: one static HTML page (plots embedded as PNG data URIs,
so the file stands alone) with the training curves from ``metrics.jsonl`` and a
heat map of expert utilization (layer x expert share of routed tokens).
Other parts (the evaluation) can add their own HTML sections."""
import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from dsv3.train.files import write_whole  # noqa: E402  (each file whole or not at all)

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


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def curves_png(records: list[dict]) -> str:
    panels = [(title, keys) for title, keys in CURVES if any(k in r for r in records for k in keys)]
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
                 sections: list[str] = ()) -> Path:
    """``out_dir/report.html`` from ``out_dir/metrics.jsonl``; ``sections`` are extra
    HTML fragments (e.g. the evaluation table). The ``summary`` is kept beside it in
    summary.json, so that `dsv3 report` rebuilding the page (to add the evaluation)
    shows the trainer's summary, not only what a checkpoint holds; without one given,
    that file's is used."""

    out_dir = Path(out_dir)
    summary_path = out_dir / "summary.json"
    if summary is not None:
        text = json.dumps(summary, indent=2)
        write_whole(summary_path, lambda f: f.write(text), "w")
    elif summary_path.is_file():
        summary = json.loads(summary_path.read_text())
    records = read_metrics(out_dir / "metrics.jsonl")
    parts = ["<!doctype html><meta charset='utf-8'><title>dsv3 training report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}</style>",
             "<h1>dsv3 training report</h1>"]
    if summary:
        parts.append("<table>" + "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in summary.items()) + "</table>")
    if records:
        parts.append(f"<h2>Curves</h2><img src='{curves_png(records)}' alt='training curves'>")
    if load_counts:
        parts.append(f"<h2>Experts</h2><img src='{heatmap_png(load_counts)}' alt='expert heat map'>")
    parts.extend(sections)
    path = out_dir / "report.html"
    write_whole(path, lambda f: f.write("\n".join(parts)), "w")
    return path


def reported(out_dir: Path) -> bool:
    """Whether the run's report is there (summary.json and report.html, each written
    whole or not at all): a finished run started again writes it only if not."""
    return all((Path(out_dir) / name).is_file() for name in ("summary.json", "report.html"))

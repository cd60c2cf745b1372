"""``dsv3 data ...``: prepare the training corpus (and, later, review and classifier commands)."""
from __future__ import annotations

import argparse
import json


def _prepare(args: argparse.Namespace) -> int:
    from dsv3.data.config import load_config
    from dsv3.data.prepare import prepare
    config = load_config(args.config)
    if args.out:
        config["output"]["dir"] = args.out
    stats = prepare(config, progress=not args.no_progress, skip_malformed=args.skip_malformed)
    summary = {name: {k: s[k] for k in ("seen", "kept", "dropped")}
               for name, s in stats["steps"].items()}
    print(json.dumps({"output": config["output"]["dir"], "steps": summary,
                      "tokens": {d: m["tokens"] for d, m in stats["tokens"]["domains"].items()}},
                     indent=2))
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    data = groups.add_parser("data", help="data pipeline: prepare, review, quality classifier")
    commands = data.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    p = commands.add_parser("prepare", help="run the pipeline from a TOML config")
    p.add_argument("--config", required=True, help="TOML file (see dsv3/data/config.py)")
    p.add_argument("--out", help="output directory (overrides [output] dir)")
    p.add_argument("--skip-malformed", action="store_true",
                   help="skip and count malformed input records instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_prepare)

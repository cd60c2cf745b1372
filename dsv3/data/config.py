"""The ``dsv3 data prepare`` config: TOML in, validated plain dicts and step objects out.

Kept apart from the runner so a config error names its key before any work starts,
and so other entry points (the trainer, tests) can build the same steps from a dict.

    [output]            dir = "out/data"
    [[sources]]         kind = "embedded" | "jsonl" | "parquet" | "text" | "hf" (any
                        datasets.load_dataset name), plus reader options; ``paths``
                        (jsonl, parquet, text) is a glob pattern or a list of them
    [steps]             order = ["heuristics", "pii", "exact_dedup", "minhash_dedup"]
    [steps.<name>]      that step's options (``quality`` needs ``model``, a directory
                        from ``dsv3 data train-quality``, and takes ``threshold``,
                        by default the one saved with the model);
                        ``domains = [...]`` limits it to those
                        domains, ``write_dropped = false`` turns its side file off
                        ``augment`` takes rate, seed and lexicon = a TSV path or "learned"
    [heldout]           fraction (default 0.05), seed: the documents held out from
                        training, never augmented (dsv3.data.heldout)
    [review]            per_stratum, seed
    [tokenizer]         vocab_size, min_frequency
    [mixture]           total_tokens, seed, max_chunk_tokens, [mixture.weights] per domain
    [scale]             backend = "serial" | "datasets" | "spark", num_proc, spill_dir

Relative paths (source ``paths``, ``[output] dir``, a lexicon TSV, a quality model) are
taken from the working directory, not from the config file's directory, as in the
trainer's config: the shipped configs, named rather than copied (``--config demo``),
pair ``[output] dir = "out/data"`` with the trainer's ``data_dir = "out/data"``. A
pattern that matches nothing is reported with the absolute path it was looked for at.

Sections are checked here and step options by :func:`build_steps`, both before
``prepare`` reads a document: a typo in ``[tokenizer]`` or ``[mixture]`` used to surface
only after the steps had run.
"""
from __future__ import annotations

import os
import tomllib
from typing import Any, Callable

from dsv3.data.augment import Augmenter, Lexicon
from dsv3.data.dedup import ExactDedup, MinHashDedup
from dsv3.data.heldout import HeldOutChooser
from dsv3.data.heuristics import HeuristicFilter, HeuristicRules
from dsv3.data.mixture import MixtureSchedule
from dsv3.data.pii import PiiFilter
from dsv3.data.quality import QualityFilter
from dsv3.data.readers import domain_name_problem
from dsv3.data.step import DroppedWriter, Step
from dsv3.validate import whole_number

DEFAULT_ORDER = ["heuristics", "pii", "exact_dedup", "minhash_dedup"]
SOURCE_KINDS = ("embedded", "jsonl", "parquet", "text", "hf")
SECTIONS = ("output", "sources", "steps", "heldout", "review", "tokenizer", "mixture", "scale")
SCALE_BACKENDS = ("serial", "datasets", "spark")
# the options each kind of source takes besides ``kind`` (its reader's keywords)
_READER_OPTIONS = ("paths", "text_field", "domain_field", "default_domain", "on_error")
SOURCE_OPTIONS = {"embedded": ("domains", "max_docs_per_domain"),
                  "hf": ("name", "config", "split", "data_files", "streaming", "text_field",
                         "domain_field", "default_domain", "on_error"),
                  "jsonl": _READER_OPTIONS, "parquet": _READER_OPTIONS, "text": _READER_OPTIONS}
# the options of the plain sections ([steps] and [scale] have their own checks)
SECTION_OPTIONS = {"output": ("dir",), "heldout": ("fraction", "seed"),
                   "review": ("per_stratum", "seed"),
                   "tokenizer": ("vocab_size", "min_frequency"),
                   "mixture": ("weights", "total_tokens", "seed", "max_chunk_tokens")}


def _heuristics(opts: dict, common: dict) -> Step:
    return HeuristicFilter(HeuristicRules.from_dict(opts), **common)


def _pii(opts: dict, common: dict) -> Step:
    return PiiFilter(opts.pop("policy", None), **_no_more(opts, "pii"), **common)


def _minhash(opts: dict, common: dict) -> Step:
    return MinHashDedup(**opts, **common)


def _exact(opts: dict, common: dict) -> Step:
    return ExactDedup(**_no_more(opts, "exact_dedup"), **common)


def _quality(opts: dict, common: dict) -> Step:
    if "model" not in opts:
        raise ValueError("steps.quality: 'model' (a directory from `dsv3 data train-quality`) "
                         "is required")
    return QualityFilter(opts.pop("model"), opts.pop("threshold", None),
                         opts.pop("batch_size", 32), **_no_more(opts, "quality"), **common)


def _augment(opts: dict, common: dict) -> Step:
    lexicon = opts.pop("lexicon", None)
    if isinstance(lexicon, str):
        if lexicon == "learned":  # prepare replaces it by the learned table before this
            raise ValueError("steps.augment.lexicon = 'learned' is resolved by prepare; "
                             "build the Lexicon with Lexicon.learn() when calling build_steps")
        lexicon = Lexicon.from_tsv(lexicon)
    elif isinstance(lexicon, dict):
        lexicon = Lexicon(lexicon)
    elif lexicon is not None:
        raise ValueError(f"steps.augment.lexicon: expected a TSV path or 'learned', "
                         f"got {lexicon!r}")
    return Augmenter(lexicon, opts.pop("rate", 0.15), opts.pop("seed", 0),
                     **_no_more(opts, "augment"), **common)


def _no_more(opts: dict, step: str) -> dict:
    if opts:
        raise ValueError(f"steps.{step}: unknown option(s) {sorted(opts)}")
    return {}


# name -> builder(options, {domains, dropped_writer}); a new step registers here.
STEP_BUILDERS: dict[str, Callable[[dict, dict], Step]] = {
    "heuristics": _heuristics, "pii": _pii, "exact_dedup": _exact, "minhash_dedup": _minhash,
    "quality": _quality, "augment": _augment,
}


BUILTIN_DIR = os.path.join(os.path.dirname(__file__), "configs")


def builtin_configs() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(BUILTIN_DIR) if f.endswith(".toml"))


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML file, or the name of a shipped one (``demo``, ``deepseek_v3_recipe``)."""
    if not os.path.exists(path) and os.fspath(path) in builtin_configs():
        path = os.path.join(BUILTIN_DIR, f"{os.fspath(path)}.toml")
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--config: no such file {os.fspath(path)!r} (shipped configs: "
                                f"{builtin_configs()})") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {os.fspath(path)!r}: invalid TOML ({e})") from None
    return validate_config(config)


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise ValueError(f"config: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    config = {"output": {"dir": "out/data"}, "sources": [{"kind": "embedded"}], "steps": {},
              "heldout": {}, "review": {}, "tokenizer": {}, "mixture": {}, "scale": {}, **config}
    scale = {"backend": "serial", "num_proc": 1, "spill_dir": None, **config["scale"]}
    if (scale["backend"] not in SCALE_BACKENDS
            or set(scale) != {"backend", "num_proc", "spill_dir"}):
        raise ValueError(f"scale: expected backend in {list(SCALE_BACKENDS)}, num_proc and "
                         f"optionally spill_dir, got {config['scale']}")
    whole_number("scale.num_proc", scale["num_proc"], 1)
    if scale["spill_dir"] is not None and not isinstance(scale["spill_dir"], str):
        raise ValueError(f"scale.spill_dir: expected a path, got {scale['spill_dir']!r}")
    config["scale"] = scale
    _check_sources(config["sources"])
    order = config["steps"].get("order", DEFAULT_ORDER)
    for name in order:
        if name not in STEP_BUILDERS:
            raise ValueError(f"steps.order: unknown step {name!r}; known: {sorted(STEP_BUILDERS)}")
    stray = sorted(set(config["steps"]) - {"order"} - set(order))
    if stray:
        raise ValueError(f"steps: options given for step(s) {stray} that are not in steps.order")
    _check_sections(config)
    config["output"] = {"dir": "out/data", **config["output"]}
    return config


def _check_sources(sources: Any) -> None:
    if not isinstance(sources, list) or not all(isinstance(s, dict) for s in sources):
        raise ValueError(f"sources: expected a list of tables ([[sources]]), got {sources!r}")
    for i, src in enumerate(sources):
        kind = src.get("kind")
        if kind not in SOURCE_KINDS:
            raise ValueError(f"sources[{i}].kind must be one of {list(SOURCE_KINDS)}, "
                             f"got {kind!r}")
        allowed = SOURCE_OPTIONS[kind]
        unknown = sorted(set(src) - {"kind", *allowed})
        if unknown:
            raise ValueError(f"sources[{i}]: unknown option(s) {unknown} for kind {kind!r}; "
                             f"known: {sorted(allowed)}")
        if "max_docs_per_domain" in src and src["max_docs_per_domain"] is not None:
            whole_number(f"sources[{i}].max_docs_per_domain", src["max_docs_per_domain"], 1)
        required = {"hf": "name", "embedded": None}.get(kind, "paths")
        if required and required not in src:
            raise ValueError(f"sources[{i}]: {required!r} is required for kind {kind!r}")
        if "default_domain" in src:
            # a file name (kept/<domain>.jsonl): found wrong here, not once the first
            # document is kept after every step has run on all before it
            why = domain_name_problem(src["default_domain"])
            if why is not None:
                raise ValueError(f"sources[{i}].default_domain: {why}")


def _check_sections(config: dict[str, Any]) -> None:
    """[output], [heldout], [review], [tokenizer] and [mixture]: names and values, so
    that a typo fails before any work (the mixture's domains can only be matched to the
    documents' once those are read: prepare does that then, and again, before the
    tokenizer is trained, against the kept ones)."""
    for section, known in SECTION_OPTIONS.items():
        if not isinstance(config[section], dict):
            raise ValueError(f"{section}: expected a table, got {config[section]!r}")
        unknown = sorted(set(config[section]) - set(known))
        if unknown:
            raise ValueError(f"{section}: unknown option(s) {unknown}; known: {list(known)}")
    minimum = {"review.per_stratum": 1, "review.seed": None,
               "tokenizer.vocab_size": 256 + 1,  # the byte alphabet, plus end-of-text
               "tokenizer.min_frequency": 0, "mixture.total_tokens": 1,
               "mixture.seed": 0,  # numpy's generators take no negative seed
               "mixture.max_chunk_tokens": 1}
    for label, low in minimum.items():
        section, key = label.split(".")
        if key in config[section]:
            whole_number(label, config[section][key], low)
    HeldOutChooser(**config["heldout"])  # its values (the names are checked above)
    if not isinstance(config["output"].get("dir", ""), str):
        raise ValueError(f"output.dir: expected a path, got {config['output']['dir']!r}")
    mixture = config["mixture"]
    if "weights" in mixture:
        if not isinstance(mixture["weights"], dict):
            raise ValueError(f"mixture.weights: expected a table of domain = shares, got "
                             f"{mixture['weights']!r}")
        try:  # shapes and sums; any positive total serves when none is given
            MixtureSchedule(mixture["weights"], mixture.get("total_tokens", 1))
        except ValueError as e:
            raise ValueError(f"mixture.{e}") from None


def build_steps(config: dict[str, Any], dropped_dir: str | None) -> list[Step]:
    """The configured steps in order, each with a side file in ``dropped_dir`` unless
    turned off (``dropped_dir=None`` turns them all off)."""
    steps = []
    for name in config["steps"].get("order", DEFAULT_ORDER):
        opts = dict(config["steps"].get(name, {}))
        write = opts.pop("write_dropped", True)
        if not isinstance(write, bool):  # "no" is a true value
            raise ValueError(f"steps.{name}.write_dropped must be true or false, got {write!r}")
        common = {"domains": opts.pop("domains", None)}
        if write and dropped_dir is not None:
            common["dropped_writer"] = DroppedWriter(os.path.join(dropped_dir, f"{name}.jsonl"))
        try:
            steps.append(STEP_BUILDERS[name](opts, common))
        except (TypeError, ValueError, OSError) as e:
            # an unknown keyword or a bad value reaching a step's constructor, a missing
            # lexicon file: the message names the option, this the step
            message = str(e)
            raise ValueError(message if message.startswith(f"steps.{name}")
                             else f"steps.{name}: {message}") from None
    return steps

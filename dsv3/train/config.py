"""Training configuration: dataclasses read from a TOML (or YAML) file and
overridden from the command line with ``--set section.key=value``.

A run is ``steps`` optimizer steps split into stages by ``fraction``; each stage
has its own objective (``lm``: next-token prediction; ``curriculum``: the same
with the sequence length rising from ``seq_len_start`` to ``seq_len``, a curriculum
by length: documents are not reordered; ``dpo``: preference optimization against a
frozen copy of the model as it entered the stage), its own domain-mixture
schedule (``mixture_start`` to ``mixture_end``, in any kind of stage) and sequence
length."""
import dataclasses
import itertools
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from dsv3.model import CHECKPOINTING, ModelConfig, preset
from dsv3.train.schedule import SCHEDULES
from dsv3.validate import number, of_type, whole_number

STAGE_KINDS = ("lm", "curriculum", "dpo")
# Configs that ship in the package, taken by name (``dsv3 train --config demo``), as
# ``dsv3 data prepare`` takes its own: from a pip install there is no path to copy.
SHIPPED_DIR = Path(__file__).parent / "configs"
PRECISIONS = ("fp32", "bf16", "fp16")


def _from_dict(cls, field: str, raw):
    """``cls(**raw)`` with unknown or missing keys named by ``field`` (not by ``__init__``)."""
    if isinstance(raw, cls):
        return raw
    of_type(field, raw, dict)
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{field}: unknown keys {unknown}; known: {sorted(known)}")
    missing = [f.name for f in fields if f.name not in raw and
               f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{field}: missing {missing}")
    return cls(**raw)


@dataclass
class StageConfig:
    name: str
    kind: str = "lm"
    fraction: float = 1.0  # share of the run's optimizer steps
    seq_len: int = 128
    seq_len_start: int | None = None  # curriculum: first sequence length (rises to seq_len)
    # Domain weights at the start and the end of the stage (interpolated linearly);
    # empty: the prepared mixture.json schedule, which runs once across all the stages
    # that leave these empty (see data.py).
    mixture_start: dict = field(default_factory=dict)
    mixture_end: dict = field(default_factory=dict)
    dpo_beta: float = 0.1
    lr_scale: float = 1.0  # DPO usually wants a smaller learning rate (its schedule restarts)

    def __post_init__(self):
        of_type("stage name", self.name, str)
        where = f"stage {self.name!r}:"
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"{where} kind must be one of {STAGE_KINDS}, got {self.kind!r}")
        number(f"{where} fraction", self.fraction, 0, 1, low_open=True)
        whole_number(f"{where} seq_len", self.seq_len, 2)
        if self.seq_len_start is not None:
            if self.kind != "curriculum":  # only a curriculum stage warms its length up
                raise ValueError(f"{where} seq_len_start is for kind 'curriculum' stages; "
                                 f"this stage is {self.kind!r} and trains at seq_len "
                                 f"throughout")
            whole_number(f"{where} seq_len_start", self.seq_len_start)
            if not 2 <= self.seq_len_start <= self.seq_len:
                raise ValueError(f"{where} seq_len_start must be in [2, seq_len={self.seq_len}], "
                                 f"got {self.seq_len_start}")
        for name in ("mixture_start", "mixture_end"):
            self._check_mixture(name, getattr(self, name))
        number(f"{where} dpo_beta", self.dpo_beta, 0, low_open=True)
        # 0 would train nothing, a negative scale would climb the loss
        number(f"{where} lr_scale", self.lr_scale, 0, low_open=True)

    def _check_mixture(self, name: str, weights) -> None:
        where = f"stage {self.name!r}: {name}"
        of_type(where, weights, dict)
        for domain, weight in weights.items():
            number(f"{where}[{domain!r}]", weight, 0)
        if weights and not sum(weights.values()) > 0:  # normalized by their sum
            raise ValueError(f"{where} needs a weight > 0, got {weights}")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # WSD: the share of steps spent decaying
    grad_clip: float = 1.0  # max global grad norm; 0 disables

    def __post_init__(self):
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise TypeError(f"optim.betas must be a pair like [0.9, 0.95], got {self.betas!r}")
        self.betas = tuple(self.betas)
        for i, beta in enumerate(self.betas):  # Adam's moving averages need beta < 1
            number(f"optim.betas[{i}]", beta, 0, 1, high_open=True)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        number("optim.lr", self.lr, 0, low_open=True)
        number("optim.weight_decay", self.weight_decay, 0)
        whole_number("optim.warmup_steps", self.warmup_steps, 0)
        # the floor of the decay as a share of lr: below 0 the lr turns negative (gradient
        # ascent), above 1 it rises
        number("optim.min_lr_ratio", self.min_lr_ratio, 0, 1)
        number("optim.decay_fraction", self.decay_fraction, 0, 1)
        number("optim.grad_clip", self.grad_clip, 0)


@dataclass
class TrainConfig:
    # Where `dsv3 data prepare` writes by default (tokenizer + token shards), and a run
    # directory beside it (the demo config's own is out/demo).
    out_dir: str = "out/run"
    data_dir: str = "out/data"
    # The share of each domain's documents held out (the last ones, whole): never
    # trained on, exported to final/heldout.jsonl for the evaluation. 0 holds none out.
    # None: the documents `dsv3 data prepare` held out ([heldout] fraction in the data
    # config), or 0.05 in data prepared before it chose them; a number must then match
    # the prepared one (dsv3.train.data.resolve_val_fraction).
    val_fraction: float | None = None
    model: str = "tiny"  # a preset of dsv3.model.PRESETS
    model_overrides: dict = field(default_factory=dict)
    steps: int = 300
    micro_batch: int = 8
    grad_accum: int = 1
    precision: str = "fp32"
    checkpointing: str = "none"
    seed: int = 0
    log_every: int = 10
    # A checkpoint every save_every optimizer steps (0: only at the end), what a run
    # killed without warning (a lost node, SIGKILL, a power cut) resumes from. Ctrl-C and
    # SIGTERM need none: the run saves at the next step and stops (see stop.py).
    save_every: int = 0
    compress_grads: bool = False  # DDP: dsv3's int8 compressed all-reduce hook
    compress_start_iter: int = 10
    optim: OptimConfig = field(default_factory=OptimConfig)
    stages: list = field(default_factory=lambda: [StageConfig("base")])

    def __post_init__(self):
        self.optim = _from_dict(OptimConfig, "optim", self.optim)
        of_type("stages", self.stages, list)
        self.stages = [_from_dict(StageConfig, f"stages.{i}", s) for i, s in enumerate(self.stages)]
        if not self.stages:
            raise ValueError("stages must list at least one stage")
        total = sum(s.fraction for s in self.stages)
        if abs(total - 1) > 1e-6:
            raise ValueError(f"stage fractions must sum to 1, got {total:g} "
                             f"({[(s.name, s.fraction) for s in self.stages]})")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, "
                             f"got {self.checkpointing!r}")
        for name in ("steps", "micro_batch", "grad_accum", "log_every"):
            whole_number(name, getattr(self, name), 1)
        for name in ("save_every", "compress_start_iter"):
            whole_number(name, getattr(self, name), 0)
        whole_number("seed", self.seed)
        if not -2**63 <= self.seed < 2**64:  # torch.manual_seed's range; past it, an
            # "Overflow when unpacking long long" naming no setting
            raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")
        # all held out would leave nothing to train on
        if self.val_fraction is not None:
            number("val_fraction", self.val_fraction, 0, 1, high_open=True)
        for name in ("out_dir", "data_dir", "model"):
            of_type(name, getattr(self, name), str)
        of_type("model_overrides", self.model_overrides, dict)
        of_type("compress_grads", self.compress_grads, bool)
        if self.stages[0].kind == "dpo":
            raise ValueError("the first stage cannot be dpo: it needs a trained reference model")
        self._check_stages_fit(self.model_config())

    def _check_stages_fit(self, model: ModelConfig) -> None:
        """Each stage against the model and the step count, here rather than when the
        stage starts, after the earlier stages trained."""
        for i, (stage, steps) in enumerate(zip(self.stages, self.stage_steps())):
            where = f"stage {stage.name!r} (stages.{i})"
            if stage.seq_len > model.max_seq_len:
                raise ValueError(f"{where}: seq_len={stage.seq_len} exceeds the model's "
                                 f"max_seq_len={model.max_seq_len} (model {self.model!r}); lower "
                                 f"the seq_len or raise model_overrides.max_seq_len")
            if steps < 1:
                raise ValueError(f"{where}: fraction={stage.fraction:g} of steps={self.steps} is "
                                 f"{steps} optimizer steps; raise steps or the fraction")
        # The LM stages share one schedule over their steps (DPO stages restart their own,
        # with a warm-up capped to fit): a warm-up as long never reaches the peak lr.
        lm_steps = sum(n for s, n in zip(self.stages, self.stage_steps()) if s.kind != "dpo")
        if self.optim.warmup_steps >= lm_steps:
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} is not below the "
                             f"{lm_steps} language-modelling steps of steps={self.steps} (DPO "
                             f"stages excluded): the learning rate would never reach its peak; "
                             f"lower optim.warmup_steps or raise steps")

    def model_config(self) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.model_overrides) - known)
        if unknown:
            raise ValueError(f"model_overrides: unknown keys {unknown}; known: {sorted(known)}")
        try:
            return preset(self.model, **self.model_overrides)
        except ValueError as e:  # the MoE's own keys and values: named as the user set them
            message = str(e)
            for prefix in ("moe:", "MoEConfig:"):
                if message.startswith(prefix):
                    raise ValueError(f"model_overrides.moe:{message[len(prefix):]}") from None
            raise

    def stage_steps(self) -> list[int]:
        """Optimizer steps per stage: each stage ends at its cumulative fraction of the
        steps, rounded (not truncated: 0.29 * 100 is 28.999999999999996 in floats), the
        last one at ``steps``."""
        ends = [round(self.steps * end) for end in itertools.accumulate(
            s.fraction for s in self.stages)]
        ends[-1] = self.steps
        return [end - start for start, end in zip([0] + ends[:-1], ends)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parse_value(text: str):
    """``--set`` values: JSON when it parses (numbers, true/false, lists, dicts), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _key_in(node, part: str, where: str, item: str):
    """``part`` as a key of ``node`` (the table or list at ``where``) for ``--set item``."""
    if isinstance(node, dict):
        return part
    if not isinstance(node, list):
        raise ValueError(f"--set {item!r}: {where} is {node!r}, not a table or list")
    if not part.isdigit() or int(part) >= len(node):
        valid = f"0 to {len(node) - 1}" if node else "none"
        raise ValueError(f"--set {item!r}: {part!r} is not an index of {where} (a list of "
                         f"length {len(node)}; valid indices: {valid})")
    return int(part)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``["optim.lr=1e-3", "stages.0.seq_len=64"]`` applied to the raw config dict; a
    missing table is created (``optim.lr`` without an ``[optim]`` table)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise ValueError(f"--set expects key=value (key like optim.lr or stages.0.seq_len), "
                             f"got {item!r}")
        *path, last = parts
        node = raw
        for i, part in enumerate(path):
            k = _key_in(node, part, ".".join(path[:i]) or "the config", item)
            node = node.setdefault(k, {}) if isinstance(node, dict) else node[k]
        node[_key_in(node, last, ".".join(path) or "the config", item)] = _parse_value(value)
    return raw


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.toml"))


def config_path(path: str | Path) -> Path:
    """``path`` if it is a file, else the shipped config of that name (a file of the
    name wins: a user's own ``demo`` is theirs)."""
    path = Path(path)
    if path.is_file():
        return path
    if str(path) in shipped_configs():
        return SHIPPED_DIR / f"{path}.toml"
    raise FileNotFoundError(f"--config: no such file {str(path)!r} (shipped configs: "
                            f"{shipped_configs()})")


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                values: dict | None = None) -> TrainConfig:
    """Read a TOML/YAML config (or start from the defaults), apply ``--set`` overrides,
    then ``values`` as they are (not parsed: ``dsv3 train --out 2024`` is a path)."""
    raw: dict = {}
    if path is not None:
        path = config_path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml  # optional: only YAML configs need it
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                message = " ".join(str(e).split())  # PyYAML's spans lines: one error line
                raise ValueError(f"config file {path}: invalid YAML ({message})") from None
        else:
            try:
                raw = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"config file {path}: invalid TOML ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path}: expected a table of settings, got {raw!r}")
    if "stages" not in raw:  # ``--set stages.0.seq_len=..`` edits the default stages
        raw["stages"] = [dataclasses.asdict(s) for s in TrainConfig().stages]
    raw = apply_overrides(raw, list(overrides))
    raw.update(values or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known: {sorted(known)}")
    return TrainConfig(**raw)

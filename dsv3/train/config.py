"""Training configuration: dataclasses read from a TOML (or YAML) file and
overridden from the command line with ``--set section.key=value``.

A run is ``steps`` optimizer steps split into stages by ``fraction``; each stage
has its own objective (``lm``: next-token prediction; ``curriculum``: the same
with the sequence length rising from ``seq_len_start`` to ``seq_len`` and
documents ordered from easy to hard; ``dpo``: preference optimization against a
frozen copy of the model as it entered the stage), its own domain-mixture
schedule and sequence length."""
import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from dsv3.model import CHECKPOINTING, ModelConfig, preset
from dsv3.train.schedule import SCHEDULES

STAGE_KINDS = ("lm", "curriculum", "dpo")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class StageConfig:
    name: str
    kind: str = "lm"
    fraction: float = 1.0  # share of the run's optimizer steps
    seq_len: int = 128
    seq_len_start: int | None = None  # curriculum: first sequence length (rises to seq_len)
    # Domain weights at the start and the end of the stage (interpolated linearly);
    # empty: the domains' natural token shares.
    mixture_start: dict = field(default_factory=dict)
    mixture_end: dict = field(default_factory=dict)
    dpo_beta: float = 0.1
    lr_scale: float = 1.0  # DPO usually wants a smaller learning rate (its schedule restarts)

    def __post_init__(self):
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"stage {self.name!r}: kind must be one of {STAGE_KINDS}, "
                             f"got {self.kind!r}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"stage {self.name!r}: fraction must be in (0, 1], got {self.fraction}")
        if self.seq_len < 2:
            raise ValueError(f"stage {self.name!r}: seq_len must be >= 2, got {self.seq_len}")
        if self.seq_len_start is not None and not 2 <= self.seq_len_start <= self.seq_len:
            raise ValueError(f"stage {self.name!r}: seq_len_start must be in [2, seq_len="
                             f"{self.seq_len}], got {self.seq_len_start}")
        for name in ("mixture_start", "mixture_end"):
            weights = getattr(self, name)
            if any((not isinstance(w, (int, float))) or w < 0 for w in weights.values()):
                raise ValueError(f"stage {self.name!r}: {name} weights must be numbers >= 0, "
                                 f"got {weights}")


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
        self.betas = tuple(self.betas)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("optim.warmup_steps and optim.grad_clip must be >= 0")


@dataclass
class TrainConfig:
    out_dir: str = "runs/demo"
    data_dir: str = "data/demo"  # what `dsv3 data prepare` wrote (tokenizer + token shards)
    model: str = "tiny"  # a preset of dsv3.model.PRESETS
    model_overrides: dict = field(default_factory=dict)
    steps: int = 300
    micro_batch: int = 8
    grad_accum: int = 1
    precision: str = "fp32"
    checkpointing: str = "none"
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    compress_grads: bool = False  # DDP: dsv3's int8 compressed all-reduce hook
    compress_start_iter: int = 10
    optim: OptimConfig = field(default_factory=OptimConfig)
    stages: list = field(default_factory=lambda: [StageConfig("base")])

    def __post_init__(self):
        if isinstance(self.optim, dict):
            self.optim = OptimConfig(**self.optim)
        self.stages = [StageConfig(**s) if isinstance(s, dict) else s for s in self.stages]
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
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.stages[0].kind == "dpo":
            raise ValueError("the first stage cannot be dpo: it needs a trained reference model")

    def model_config(self) -> ModelConfig:
        return preset(self.model, **self.model_overrides)

    def stage_steps(self) -> list[int]:
        """Optimizer steps per stage; rounding goes to the last stage."""
        counts = [int(self.steps * s.fraction) for s in self.stages]
        counts[-1] = self.steps - sum(counts[:-1])
        return counts

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parse_value(text: str):
    """``--set`` values: JSON when it parses (numbers, true/false, lists, dicts), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``["optim.lr=1e-3", "stages.0.seq_len=64"]`` applied to the raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        *path, last = key.split(".")
        node = raw
        for part in path:
            if isinstance(node, list):
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
        if isinstance(node, list):
            node[int(last)] = _parse_value(value)
        else:
            node[last] = _parse_value(value)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Read a TOML/YAML config (or start from the defaults), apply ``--set`` overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        if path.suffix in (".yaml", ".yml"):
            import yaml  # optional: only YAML configs need it
            raw = yaml.safe_load(path.read_text()) or {}
        else:
            raw = tomllib.loads(path.read_text())
    raw = apply_overrides(raw, list(overrides))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known: {sorted(known)}")
    return TrainConfig(**raw)

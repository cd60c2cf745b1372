"""The monitoring panel's numbers and where they go: every ``log_every`` steps one
record to ``metrics.jsonl`` and TensorBoard (``tensorboard --logdir OUT_DIR/tb``).

MFU uses the PaLM-paper count of training FLOPs per token,
``6 * N_active + 12 * n_layers * seq_len * dim`` (N_active: parameters one token
uses, the embedding excluded (a lookup) unless tied to the output head (a matmul);
the second term is attention's score and value products), against the dense-matmul
rate measured on this device at start-up in the run's precision: "how much of what
this machine's matmuls can do".
"""
import json
import math
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from dsv3.model import observing_selective_saves
from dsv3.moe import MoEStats
from dsv3.ops.backend import native_cpu_half_matmul
from dsv3.whole_files import write_text_whole


# What TensorBoard's SummaryWriter writes into OUT_DIR/tb: a fresh run removes these
# alone (a user's own files there stay).
TB_FILES = ("events.out.tfevents.*",)


def remove_tb_logs(directory: Path) -> None:
    for pattern in TB_FILES:
        for path in directory.glob(pattern):
            if path.is_file():
                path.unlink(missing_ok=True)


class MetricsLogger:
    """Opened by ``start``: a fresh run starts the files anew (a stale run's records
    must not mix into its report); a resumed one keeps the records up to its
    checkpoint's step, in the file and in ``history`` (the summary's first loss is
    the run's), and drops those logged after it: the resumed run logs those steps
    again, and they would be there twice (TensorBoard: purged from ``step + 1``)."""

    def __init__(self, out_dir: Path, enabled: bool = True):
        self.out_dir, self.enabled = out_dir, enabled
        self.history: list[dict] = []
        self._jsonl = self._tb = None

    def start(self, fresh: bool, step: int = 0) -> None:
        """``step``: the checkpoint's step a resumed run continues from."""
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "metrics.jsonl"
        if not fresh:
            self.history = [r for r in _read_records(path) if r["step"] <= step]
            kept = "".join(json.dumps(r) + "\n" for r in self.history)
            write_text_whole(path, kept)  # a crash here keeps the old file
        self._jsonl = path.open("w" if fresh else "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            if fresh:
                remove_tb_logs(self.out_dir / "tb")
            self._tb = SummaryWriter(str(self.out_dir / "tb"),
                                     purge_step=None if fresh else step + 1)
        except ImportError:  # tensorboard is optional: the JSONL file has everything
            self._tb = None

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        self.history.append(record)
        if self._jsonl is None:  # not started (or not the main rank): history only
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _read_records(path: Path) -> list[dict]:
    """metrics.jsonl's records; a line cut short by a crash mid-write is left out
    (it can only be the last one written before the crash, after the checkpoint)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 1024) -> float:
    """Dense matmul FLOP/s on this device and dtype (median of a few runs)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / sorted(times)[len(times) // 2]


def peak_matmul_flops(device: torch.device, autocast_dtype: torch.dtype | None,
                      precision: str) -> float:
    """The device's matmul FLOP/s in a run's precision, MFU's denominator. bf16/fp16
    autocast on a CPU that torch has no native matmul for (AVX2, no AVX512/AMX) is
    told: the model's own layers then multiply many times slower than in fp32
    (measured on a 2-core AVX2 EPYC: ~1 against ~90 GFLOP/s), which nothing else
    says. There the peak is fp32's: dsv3's expert GEMMs multiply fp32 copies, and
    against the half-precision rate MFU read over 100%. The half-precision rate is
    then timed on a small matmul (the usual 1024^3 ones took 13 s there)."""
    dtype = autocast_dtype or torch.float32
    if device.type != "cpu" or autocast_dtype is None or native_cpu_half_matmul(dtype):
        return measure_matmul_flops(device, dtype)
    fp32_flops = measure_matmul_flops(device, torch.float32)
    half_flops = measure_matmul_flops(device, dtype, size=256)
    if half_flops < fp32_flops:
        warnings.warn(f"precision={precision!r}: this CPU has no native {precision} matmul "
                      f"(torch runs it on AVX512 or AMX), and multiplies at "
                      f"{half_flops / 1e9:.1f} GFLOP/s in it against {fp32_flops / 1e9:.1f} "
                      f"in fp32: precision='fp32' trains faster here", stacklevel=3)
    return max(fp32_flops, half_flops)


def training_flops_per_token(model, seq_len: int) -> float:
    config = model.config
    # The embedding is a lookup, not a matmul. Tied, its weight is also the output
    # head's (counted once by num_parameters), a matmul: then it stays in.
    lookup = 0 if config.tie_embeddings else model.embed.weight.numel()
    active = model.num_parameters(active=True) - lookup
    return 6 * active + 12 * config.n_layers * seq_len * config.dim


def peak_memory_bytes(device: torch.device) -> int:
    """Device memory high-water mark (CUDA) or the process's resident one (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@contextmanager
def saved_activation_bytes(counter: list, model=None):
    """Adds to counter[0] the bytes autograd saves for the backward inside the block
    (each storage once), leaving out ``model``'s parameters (saved by reference, not
    activations) and autocast's copies of them. Checkpointed regions save their
    inputs here, and selective checkpointing the op outputs it keeps (on any torch:
    see observing_selective_saves)."""
    params = list(model.parameters()) if model is not None else []
    seen = {p.untyped_storage().data_ptr() for p in params}
    param_ids = {id(p) for p in params}

    def weight_cast(tensor) -> bool:
        # Autocast's low-precision copy of a parameter (or a view of it, the transposed
        # weight a matmul saves): a new storage, but the weights' (the planner counts it
        # there), not an activation.
        base = tensor._base if tensor._base is not None else tensor
        fn = base.grad_fn
        if fn is None or type(fn).__name__ != "ToCopyBackward0":
            return False
        source = fn.next_functions[0][0]
        return id(getattr(source, "variable", None)) in param_ids

    def count(tensor):
        if (isinstance(tensor, torch.Tensor) and tensor.device.type != "meta"
                and not weight_cast(tensor)):
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in seen:
                seen.add(key)
                counter[0] += storage.nbytes()

    def pack(tensor):
        count(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            observing_selective_saves(count):
        yield


def step_moe_stats(micro_stats) -> MoEStats:
    """One MoE layer's stats over an optimizer step's micro-batches: expert loads and
    dropped copies summed (the step's tokens), aux/z losses and router entropy
    averaged (the loss the step trained on is the micro-batches' mean)."""
    if len(micro_stats) == 1:  # no accumulation: the step's own, no device ops per step
        return micro_stats[0]
    entropies = [s.router_entropy for s in micro_stats if s.router_entropy is not None]
    return MoEStats(sum(s.tokens_per_expert for s in micro_stats),
                    sum(s.dropped_tokens for s in micro_stats),
                    sum(s.aux_loss for s in micro_stats) / len(micro_stats),
                    sum(s.z_loss for s in micro_stats) / len(micro_stats),
                    sum(entropies) / len(entropies) if entropies else None)


def moe_metrics(model, step_stats: list[MoEStats]) -> tuple[dict, list]:
    """The panel's moe/* metrics of one optimizer step, from ``step_stats`` (per MoE
    layer of ``model``, see step_moe_stats: every micro-batch, not the last one):
    per-layer expert load (max/mean, coefficient of variation), router entropy,
    dropped copies, aux/z losses, and the expert-bias norm after the step."""
    out, loads = {}, []
    aux = z = dropped = 0.0
    entropies, bias_sq = [], 0.0
    for index, (layer, stats) in enumerate(zip(model.moe_layers(), step_stats)):
        counts = stats.tokens_per_expert.float()
        mean = counts.mean().item()
        loads.append(counts.cpu())
        out[f"moe/layer{index}/load_max_over_mean"] = counts.max().item() / max(mean, 1e-9)
        out[f"moe/layer{index}/load_cv"] = (counts.std(unbiased=False).item() / max(mean, 1e-9))
        aux += stats.aux_loss.item()
        z += stats.z_loss.item()
        dropped += stats.dropped_tokens.item()
        if stats.router_entropy is not None:
            entropies.append(stats.router_entropy.item())
        if layer.expert_bias is not None:
            bias_sq += layer.expert_bias.square().sum().item()
    if loads:
        out["moe/load_max_over_mean"] = max(v for k, v in out.items() if k.endswith("max_over_mean"))
        out["moe/load_cv"] = sum(v for k, v in out.items() if k.endswith("/load_cv")) / len(loads)
        out["moe/aux_loss"], out["moe/z_loss"], out["moe/dropped_tokens"] = aux, z, dropped
        out["moe/expert_bias_norm"] = math.sqrt(bias_sq)
        if entropies:
            out["moe/router_entropy"] = sum(entropies) / len(entropies)
    return out, loads


def param_norm(model) -> float:
    return math.sqrt(sum(p.detach().float().square().sum().item() for p in model.parameters()))

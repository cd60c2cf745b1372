"""``dsv3 plan``: how much memory and communication a training configuration
needs, and how many GPUs of a given size it takes, computed from the model
configuration alone (a DeepSeek-V3-sized model is never instantiated).

Per GPU, with AdamW over fp32 master weights:
  parameters 4 B (6 B under bf16/fp16 mixed precision: the fp32 master plus the
  low-precision copy autocast keeps until the backward), gradients 4 B, optimizer
  state 8 B (two moments) per parameter held, for the parameters a GPU holds:
  everything under plain data parallelism ("ddp"); under "ep" the dense part plus
  n_experts/E whole experts, where the expert-parallel group size E divides
  n_experts (``dsv3.MoE(config, ep_group=...)`` needs that) and the N/E factor
  replicates the expert shards (data parallel). E is the largest size that also
  divides N (every GPU used: 4 x 3 on 12 GPUs with 16 experts) where that fits,
  else the largest divisor of n_experts <= N, with GPUs left over (8 x 1, +4) when
  that is what fits. ZeRO stages 1-3 also
  shard the replicated (non-expert) part's optimizer state, gradients and weights
  over the N GPUs.
Activations per micro-batch (what autograd saves; in the compute dtype, but for the
  residual stream and the RMSNorms, fp32 under autocast too):
  per token and layer, attention saves its norm input, the q/k/v projections, the
  attention output and its log-sum-exp, and the output projection's input;
  the FFN saves its norm input and, for an MoE layer, the routed copies' hidden
  states (2F and F per copy), the copies' outputs, and the routing; plus the
  log-softmax (vocab per token, fp32) of the loss. "full" checkpointing keeps only
  each block's input and recomputes one block at a time; "selective" keeps the
  matmul outputs the backward reads and recomputes the elementwise work. The formulas
  are checked against the bytes autograd actually saves on the small presets, in fp32
  and bf16 (tests/test_planner.py).
A DPO stage (``dpo_seq_len``) runs 2 x micro_batch rows (chosen and rejected) of its
  seq_len - 1 input tokens through the model, and holds a frozen reference model:
  4 B per parameter held, sharded as the weights are; no autocast copy (autocast
  caches its casts of weights that require grad only), and its no-grad forward
  saves no activations. Activations are the larger of the LM and the DPO stages'.
Communication per optimizer step and GPU: the gradient all-reduce of the
replicated parameters (ring: 2 (N-1)/N of the bytes; int8 compression sends
~25.4% of fp32) plus, under "ep", the experts' over their N/E replicas; under
ZeRO-3 the all-gathers of the sharded weights ((N-1)/N of them, twice a
micro-batch, and for a DPO stage's reference once more); and the
token all-to-alls within the E-way group (dispatch and combine, forward and backward,
and forward again in the backward of a checkpointed block).
"""
import math
from dataclasses import dataclass

from dsv3.model import CHECKPOINTING, ModelConfig
from dsv3.train.config import PRECISIONS
from dsv3.validate import whole_number

GB = 1e9


def parameter_counts(config: ModelConfig) -> dict:
    """{"total", "experts", "active"}: exact counts of ``Transformer(config)``."""
    d, heads = config.dim, config.n_heads
    kv_heads = config.n_kv_heads or heads
    head_dim = d // heads
    per_layer_attn = 2 * d + d * (heads + 2 * kv_heads) * head_dim + d * d
    dense_ffn = 3 * d * config.dense_ffn_dim
    total = config.vocab_size * d * (1 if config.tie_embeddings else 2) + d
    experts = active_experts = 0
    for layer in range(config.n_layers):
        total += per_layer_attn
        if config.moe is None or layer < config.n_dense_layers:
            total += dense_ffn
            continue
        m = config.moe
        per_expert = 3 * m.ffn_dim * d
        shared = 3 * m.n_shared_experts * m.ffn_dim * d
        total += m.n_experts * d + m.n_experts * per_expert + shared
        experts += m.n_experts * per_expert
        active_experts += m.top_k * per_expert
    return {"total": total, "experts": experts, "active": total - experts + active_experts}


def expert_parallel_size(config: ModelConfig, gpus: int) -> int:
    """The widest expert-parallel group on ``gpus`` GPUs: the largest divisor of
    n_experts that is <= gpus (1 for a dense model); it may leave GPUs over."""
    if config.moe is None:
        return 1
    n = config.moe.n_experts
    return max(e for e in range(1, min(n, gpus) + 1) if n % e == 0)


def whole_expert_parallel_size(config: ModelConfig, gpus: int) -> int:
    """The widest expert-parallel group that uses all ``gpus`` GPUs in whole groups:
    the largest size dividing both n_experts and gpus (1 for a dense model)."""
    return 1 if config.moe is None else math.gcd(config.moe.n_experts, gpus)


def activation_bytes_per_token(config: ModelConfig, seq_len: int, checkpointing: str,
                               dtype_bytes: int, recompute_peak: bool = True) -> float:
    """Bytes autograd keeps per token of a micro-batch (see the module docstring);
    ``recompute_peak`` adds the one block that full checkpointing recomputes at a time."""
    d, heads = config.dim, config.n_heads
    # The residual stream and the RMSNorms stay fp32 under autocast (the embedding is
    # fp32, a bf16 branch added to it promotes back): a norm's input, its normalized
    # output and inverse RMS, and a checkpointed block's input, are 4 B whatever the
    # precision. Before, they were priced in the compute dtype, half under bf16.
    norm = 4 * (2 * d + 1)
    # q/k/v and their rotated copies, attention output and log-sum-exp, projection inputs
    kv = (config.n_kv_heads or heads) * (d // heads)
    attention = 5 * d + 3 * kv + 2 * heads
    # Selective checkpointing keeps each block's input and the matmul outputs that the
    # backward reads: q|k|v, the attention output and log-sum-exp, the gate|up outputs,
    # the experts' outputs, the router logits and routing (not the projections into the
    # residual stream: see dsv3.model).
    selective_attention = d + (d + 2 * kv) + d + heads
    blocks, kept_selective, biggest_block = [], 0.0, 0.0
    for layer in range(config.n_layers):
        if config.moe is None or layer < config.n_dense_layers:
            ffn = d + 3 * config.dense_ffn_dim  # input, gate|up output, SwiGLU output
            selective_ffn = 2 * config.dense_ffn_dim
        else:
            m = config.moe
            # input; per routed copy the gate|up and SwiGLU outputs and the expert output;
            # the shared experts' hidden states; router logits and routing (ids, weights)
            routing = m.n_experts + 4 * m.top_k
            ffn = (d + m.top_k * (3 * m.ffn_dim + d) + 3 * m.n_shared_experts * m.ffn_dim
                   + routing)
            selective_ffn = (m.top_k * (2 * m.ffn_dim + d) + 2 * m.n_shared_experts * m.ffn_dim
                             + m.n_experts + 2 * m.top_k)
        block = 2 * norm + dtype_bytes * (attention + ffn)
        biggest_block = max(biggest_block, block)
        blocks.append(block)
        kept_selective += 4 * d + dtype_bytes * (selective_attention - d + selective_ffn)
    if checkpointing == "full":
        kept = 4 * d * config.n_layers + (biggest_block if recompute_peak else 0)
    elif checkpointing == "selective":
        kept = kept_selective
    else:
        kept = sum(blocks)
    # final norm, head input in the compute dtype; the loss keeps the fp32 log-softmax
    return kept + norm + dtype_bytes * d + 4 * config.vocab_size + 8


@dataclass
class Plan:
    parameters: dict
    strategy: str
    gpus: int
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    activations_gb: dict  # checkpointing mode -> GB per GPU
    allreduce_gb: float  # per step and GPU
    alltoall_gb: float
    fits: bool
    expert_parallel: int = 1  # E: GPUs the experts are sharded over; gpus / E replicas
    reference_gb: float = 0.0  # a DPO stage's frozen reference model, per GPU
    allgather_gb: float = 0.0  # ZeRO-3's weight all-gathers, per step and GPU

    @property
    def buildable(self) -> bool:
        """Whether the GPUs split into whole E-way expert-parallel groups."""
        return self.gpus % self.expert_parallel == 0

    def layout(self) -> str:
        """How the GPUs are split between expert and data parallelism."""
        text = f"{self.expert_parallel}-way expert x {self.gpus // self.expert_parallel}-way data"
        return text if self.buildable else text + f" (+{self.gpus % self.expert_parallel} GPUs left over)"

    def table(self) -> str:
        rows = [("parameters (total / active)",
                 f"{_count(self.parameters['total'])} / {_count(self.parameters['active'])}"),
                ("strategy, GPUs", f"{self.strategy}, {self.gpus}"),
                ("parallel layout", self.layout()),
                ("weights per GPU", f"{self.weights_gb:.2f} GB"),
                ("gradients per GPU", f"{self.gradients_gb:.2f} GB"),
                ("optimizer state per GPU", f"{self.optimizer_gb:.2f} GB")]
        if self.reference_gb:
            rows.append(("DPO reference model per GPU", f"{self.reference_gb:.2f} GB"))
        rows += [(f"activations per GPU ({mode})", f"{gb:.2f} GB")
                 for mode, gb in self.activations_gb.items()]
        rows += [("gradient all-reduce per step", f"{self.allreduce_gb:.2f} GB"),
                 ("expert all-to-all per step", f"{self.alltoall_gb:.2f} GB")]
        if self.allgather_gb:
            rows.insert(-1, ("ZeRO-3 weight gathers per step", f"{self.allgather_gb:.2f} GB"))
        return "\n".join(f"{name:32s} {value}" for name, value in rows)


def plan(config: ModelConfig, *, gpus: int, gpu_mem_gb: float, micro_batch: int, seq_len: int,
         grad_accum: int = 1, precision: str = "bf16", checkpointing: str = "none",
         strategy: str = "ep", compress_grads: bool = False, zero: int = 0,
         dpo_seq_len: int | None = None) -> Plan:
    """``seq_len``: the longest LM stage's; ``dpo_seq_len``: the longest DPO stage's
    (None: the config has none). ``zero``: ZeRO stage for the replicated part (1:
    optimizer state sharded over the GPUs, 2: also gradients, 3: also weights)."""
    if strategy not in ("ddp", "ep"):
        raise ValueError(f"strategy must be 'ddp' or 'ep', got {strategy!r}")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0, 1, 2 or 3, got {zero!r}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    # an unknown precision was priced as bf16 without a word; an unknown checkpointing
    # mode failed with a bare KeyError at the end
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {checkpointing!r}")
    for name, value in (("micro_batch", micro_batch), ("seq_len", seq_len),
                        ("grad_accum", grad_accum)):
        whole_number(name, value, 1)
    if dpo_seq_len is not None:  # its rows are dpo_seq_len - 1 input tokens
        whole_number("dpo_seq_len", dpo_seq_len, 2)
    # 0 or NaN memory would make nothing fit and gpus_needed search all the way up
    if not (math.isfinite(gpu_mem_gb) and gpu_mem_gb > 0):
        raise ValueError(f"gpu_mem_gb must be positive and finite, got {gpu_mem_gb}")
    settings = dict(config=config, gpus=gpus, gpu_mem_gb=gpu_mem_gb, micro_batch=micro_batch,
                    seq_len=seq_len, grad_accum=grad_accum, precision=precision,
                    checkpointing=checkpointing, strategy=strategy,
                    compress_grads=compress_grads, zero=zero, dpo_seq_len=dpo_seq_len)
    if strategy == "ddp":
        return _price(ep=1, **settings)
    # Every GPU in whole expert groups where that fits; before, the widest split was
    # priced whatever it left over (12 GPUs, 16 experts: 8 x 1 with 4 idle, not 4 x 3).
    whole = _price(ep=whole_expert_parallel_size(config, gpus), **settings)
    widest = expert_parallel_size(config, gpus)
    if whole.fits or whole.expert_parallel == widest:
        return whole
    return _price(ep=widest, **settings)


def _price(config: ModelConfig, *, ep: int, gpus: int, gpu_mem_gb: float, micro_batch: int,
           seq_len: int, grad_accum: int, precision: str, checkpointing: str, strategy: str,
           compress_grads: bool, zero: int, dpo_seq_len: int | None) -> Plan:
    """The plan of an ``ep``-way expert-parallel layout (inputs checked by ``plan``)."""
    counts = parameter_counts(config)
    held = counts["total"] - counts["experts"] + counts["experts"] / ep
    replicated = counts["total"] if strategy == "ddp" else counts["total"] - counts["experts"]
    dtype_bytes = 4 if precision == "fp32" else 2
    tokens = micro_batch * seq_len
    activations = {mode: activation_bytes_per_token(config, seq_len, mode, dtype_bytes)
                   * tokens / GB for mode in ("none", "selective", "full")}
    dpo_tokens = 0
    if dpo_seq_len is not None:
        # chosen and rejected rows; their inputs drop the last token (see dsv3.train.dpo)
        dpo_tokens = 2 * micro_batch * (dpo_seq_len - 1)
        activations = {mode: max(gb, activation_bytes_per_token(config, dpo_seq_len - 1, mode,
                                                                dtype_bytes) * dpo_tokens / GB)
                       for mode, gb in activations.items()}
    ring = 2 * (gpus - 1) / gpus
    replicas = gpus // ep  # of each expert shard (data parallel)
    expert_ring = 2 * (replicas - 1) / replicas if strategy == "ep" else 0.0
    allreduce = ((ring * replicated + expert_ring * (held - replicated)) * 4
                 * (0.254 if compress_grads else 1.0) / GB)
    allgather = 0.0
    if zero == 3:
        # ZeRO-3 holds 1/N of the replicated weights: each micro-batch gathers them for
        # its forward and again for its backward (in the compute dtype), and a DPO step
        # once more for the frozen fp32 reference's forward. ZeRO paper (Rajbhandari et
        # al., 2020): 3x the weights' bytes a step with the gradients' reduce-scatter,
        # against 2x for data parallelism.
        gathered_bytes = 2 * dtype_bytes + (4 if dpo_seq_len is not None else 0)
        allgather = ring / 2 * replicated * gathered_bytes * grad_accum / GB
    moe_layers = 0 if config.moe is None else config.n_layers - config.n_dense_layers
    alltoall = 0.0
    if strategy == "ep" and ep > 1 and moe_layers:
        # dispatch + combine, forward + backward, the share bound for other GPUs; a
        # checkpointed block runs its forward again in the backward: its exchanges too
        # (selective checkpointing keeps matmul and routing outputs, not the exchanges')
        exchanges = 4 if checkpointing == "none" else 6
        # a DPO step also sends its rows through the reference: its forward's two
        # exchanges, never checkpointed (it runs in eval mode, without a backward)
        token_exchanges = max(tokens * exchanges, dpo_tokens * (exchanges + 2))
        alltoall = (moe_layers * token_exchanges * config.moe.top_k * grad_accum * config.dim
                    * dtype_bytes * (ep - 1) / ep / GB)
    sharded = held - replicated  # the experts a GPU owns under "ep"

    def per_gpu(bytes_per_param: int, zero_stage: int) -> float:
        share = replicated / gpus if zero >= zero_stage else replicated
        return (share + sharded) * bytes_per_param / GB

    # mixed precision: fp32 master + the autocast copy (2 B) kept until the backward
    weights = per_gpu(4 if precision == "fp32" else 6, 3)
    gradients, optimizer = per_gpu(4, 2), per_gpu(8, 1)
    reference = per_gpu(4, 3) if dpo_seq_len is not None else 0.0  # fp32, frozen
    fits = (weights + reference + gradients + optimizer + activations[checkpointing]
            <= 0.9 * gpu_mem_gb)
    return Plan(counts, strategy, gpus, weights, gradients, optimizer, activations, allreduce,
                alltoall, fits, ep, reference, allgather)


def gpus_needed(config: ModelConfig, gpu_mem_gb: float, max_gpus: int = 4096, **kwargs) -> int | None:
    """Fewest GPUs on which the plan fits with a buildable layout (whole expert-parallel
    groups, see ``Plan.layout``), among the counts ``_gpu_counts`` tries, or None up to
    max_gpus."""
    for gpus in _gpu_counts(config, max_gpus, kwargs.get("strategy", "ep")):
        result = plan(config, gpus=gpus, gpu_mem_gb=gpu_mem_gb, **kwargs)
        if result.fits and result.buildable:
            return gpus
    return None


def _gpu_counts(config: ModelConfig, max_gpus: int, strategy: str) -> list[int]:
    """Powers of two, and under "ep" each divisor of n_experts times a power of two.
    Powers of two alone never hold whole expert groups once n_experts has an odd factor
    (6 experts: 4 GPUs split 3-way, 8 GPUs 6-way, each with GPUs left over), so a
    config that fits on 3 or 6 GPUs was reported as needing more than max_gpus."""
    n_experts = config.moe.n_experts if strategy == "ep" and config.moe is not None else 1
    counts = set()
    for divisor in (d for d in range(1, n_experts + 1) if n_experts % d == 0):
        gpus = divisor
        while gpus <= max_gpus:
            counts.add(gpus)
            gpus *= 2
    return sorted(counts)


def _count(n: float) -> str:
    """A parameter count in the unit that shows it: 1.43M, not 0.001B. The unit is
    picked after rounding to 3 digits, so 999.6M shows as 1B, not 1e+03M."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if float(f"{n / scale:.3g}") >= 1:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"

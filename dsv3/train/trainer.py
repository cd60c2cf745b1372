"""The training loop: one ``Trainer`` runs every stage of a ``TrainConfig``.

Per optimizer step: pick the stage and its learning rate, draw ``grad_accum``
micro-batches (stateless sampling, see data.py), forward under autocast (bf16, or
fp16 with a dynamic loss scale; weights stay fp32), backward (DDP all-reduces
only on the last micro-batch, through dsv3's int8 hook if asked), unscale, clip,
step, and nudge the MoE selection biases (not on a step fp16 skipped; under DDP
from every rank's routing counts). Every ``log_every`` steps a metrics record (its
losses and expert loads those of every rank's batch, see rank_metrics.py); every
``save_every`` steps and at the end a checkpoint (each rank saves its own data
position, see checkpoint.py), at the end the exported model and the HTML report.
Ctrl-C or SIGTERM stops after the current step with a checkpoint (stop.py; from the
last step on, the run finishes instead: the handlers stay until its export is written). A
resumed run keeps the metrics up to its checkpoint's step and drops those logged
after it (they are trained again).
"""
import signal
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from dsv3.data.mixture import MixtureSchedule
from dsv3.eval.perplexity import perplexity_of
from dsv3.model import Transformer
from dsv3.moe import moe_aux_loss, moe_update_bias
from dsv3.train import checkpoint as ckpt
from dsv3.train.config import TrainConfig
from dsv3.train.data import (TrainData, check_preference_stages, check_stage_mixtures,
                             preference_batch, preference_lengths, stage_mixture)
from dsv3.train.dpo import dpo_loss
from dsv3.train.metrics import (MetricsLogger, moe_metrics, peak_matmul_flops, param_norm,
                                peak_memory_bytes, saved_activation_bytes, step_moe_stats,
                                training_flops_per_token)
from dsv3.train.rank_metrics import reduce_logged_step, summed_over_ranks
from dsv3.train.report import reported, write_report
from dsv3.train.schedule import lr_factor
from dsv3.train.stop import StopRequests, TrainingStopped, control_group

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    def __init__(self, config: TrainConfig, data: TrainData, device: str | None = None):
        check_stage_mixtures(config.stages, data.domains)  # not when a later stage starts
        check_preference_stages(config.stages, data.train)
        if config.val_fraction is None:  # saved as the share the data was split with
            config.val_fraction = data.val_fraction
        self.config, self.data = config, data
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.out_dir = Path(config.out_dir)
        torch.manual_seed(config.seed)
        wanted = config.model_overrides.get("vocab_size", data.vocab_size)
        if wanted != data.vocab_size:  # it was replaced without a word
            raise ValueError(f"model_overrides.vocab_size={wanted}: the model takes its "
                             f"tokenizer's vocabulary, {data.vocab_size} in "
                             f"{config.data_dir}; drop the override, or prepare the data "
                             f"with another [tokenizer] vocab_size")
        model_config = replace(config.model_config(), vocab_size=data.vocab_size)
        self.model = Transformer(model_config).to(self.device)
        self.model.set_checkpointing(config.checkpointing)
        self.compression = None
        self.ddp = None
        if self.distributed:
            # With the int8 hook, DDP keeps its first bucket layout: find_unused_parameters
            # stops the rebuild after the first step. The hook's residuals are keyed by
            # layout, and a resumed run starts from the first layout again: rebuilt, the
            # saved residuals would find no bucket of theirs (and the resumed run would
            # part from the one that never stopped). The hook waits for each bucket
            # anyway, so the rebuilt order would overlap nothing more.
            # The gradients are views into DDP's buckets: by default DDP keeps the buckets
            # beside them, another 4 B a parameter (measured: 369 MB of RSS for a 50M
            # parameter model against 202 MB with views), which the planner's 4 B leaves out.
            self.ddp = DDP(self.model, find_unused_parameters=config.compress_grads,
                           gradient_as_bucket_view=True)
            if config.compress_grads:
                from dsv3.distributed import CompressionState, int8_compress_hook
                self.compression = CompressionState(start_iter=config.compress_start_iter)
                self.ddp.register_comm_hook(self.compression, int8_compress_hook)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        o = config.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=o.betas)
        self.autocast_dtype = AUTOCAST_DTYPES[config.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.step = 0
        self.skipped_steps = 0
        self.reference = None  # the frozen model a DPO stage compares against
        self.reference_stage = -1  # the DPO stage it was frozen for (as it entered it)
        self.domain_tokens: dict[str, int] = {}  # realized mixture since the last log, in tokens
        self._loader = self._batches = None  # the current stage's PackedLoader and iterator
        # How the prepared mixture schedule spans the stages: "run" (once across those
        # without their own mixture). A checkpoint from before it kept "stage" (each such
        # stage ran the whole schedule, in units of at most 1024 tokens) and resumes so.
        self.mixture_scope = "run"
        # Each stage's part of it, as the run started: kept in the checkpoint, so that a
        # resume with a later stage changed (its seq_len: allowed, "from here on") does
        # not move the current stage's part mid-stage.
        self.mixture_spans = self._spans_from(0, 0.0, [])
        self._loader_stage = -1
        # Routed copies per expert over the run, kept on the device (no per-step sync);
        # int64: fp32 stops counting single copies at 2^24 (16.8M) an expert.
        self.load_counts = [torch.zeros(m.config.n_experts, dtype=torch.int64, device=self.device)
                            for m in self.model.moe_layers()]
        self.moe_stats = []  # per MoE layer, the last step's stats (step_moe_stats)
        self.logger = MetricsLogger(self.out_dir, enabled=self.rank == 0)
        self.peak_flops = peak_matmul_flops(self.device, self.autocast_dtype, config.precision)
        self._stage_ends = torch.tensor(config.stage_steps()).cumsum(0).tolist()
        # where the ranks agree on a stop request each step (stop.py); made by every rank
        self._stop_group = control_group() if self.distributed else None

    # --- stages ------------------------------------------------------------------------------
    def _stage_start(self, index: int) -> int:
        return self._stage_ends[index - 1] if index else 0

    def stage_at(self, step: int):
        """(index, stage, progress through it) of optimizer step ``step``; progress runs
        from 0 at the stage's first step to 1 at its last (1 for a one-step stage)."""
        index = next(i for i, end in enumerate(self._stage_ends) if step < end)
        start = self._stage_start(index)
        last = self._stage_ends[index] - 1 - start
        return index, self.config.stages[index], (step - start) / last if last else 1.0

    @staticmethod
    def seq_len_at(stage, progress: float) -> int:
        """Curriculum stages warm the sequence length up linearly (multiples of 8 on
        the way), reaching the stage's own seq_len at its last step (progress 1)."""
        if stage.kind != "curriculum" or stage.seq_len_start is None:
            return stage.seq_len
        length = stage.seq_len_start + progress * (stage.seq_len - stage.seq_len_start)
        if length >= stage.seq_len:  # seq_len itself need not be a multiple of 8
            return stage.seq_len
        return max(stage.seq_len_start, int(length) // 8 * 8)

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step``."""
        index, stage, _ = self.stage_at(step)
        return self.config.optim.lr * stage.lr_scale * self._lr_factor(step, index, stage)

    def _lr_factor(self, step: int, index: int, stage) -> float:
        """One schedule for the language-modelling stages, over their steps alone (a
        DPO stage between them pauses it, so their decay ends with the last of them);
        each DPO stage restarts it over its own steps (its own warm-up and decay):
        preference tuning starts from a trained model, not from the tail of
        pre-training's decay."""
        o = self.config.optim
        start = self._stage_start(index)
        if stage.kind != "dpo":
            lm_steps = [n if s.kind != "dpo" else 0
                        for s, n in zip(self.config.stages, self.config.stage_steps())]
            return lr_factor(sum(lm_steps[:index]) + step - start, sum(lm_steps),
                             o.warmup_steps, o.schedule, o.min_lr_ratio, o.decay_fraction)
        length = self._stage_ends[index] - start
        return lr_factor(step - start, length, min(o.warmup_steps, max(1, length // 10)),
                         o.schedule, o.min_lr_ratio, o.decay_fraction)

    def _frozen_copy(self, state: dict | None = None) -> Transformer:
        """The DPO reference: the model as it is now (or ``state``), frozen. Built
        without drawing from the global RNG: a resume builds it again after restoring
        the RNG, which its random init then moved on from the uninterrupted run's."""
        with torch.random.fork_rng(devices=[]):
            reference = Transformer(self.model.config).to(self.device)
        reference.load_state_dict(state if state is not None else self.model.state_dict())
        return reference.eval().requires_grad_(False)

    def _preference_weights(self, index: int, progress: float) -> dict:
        """The domain shares a DPO stage draws its pairs by: its own mixture at its
        ``progress``, else the prepared schedule where the language-model stages before
        it left it (the stage pauses it, as a stage of its own mixture does)."""
        stage = self.config.stages[index]
        own = stage_mixture(stage, self.data.domains)
        tokens = self._schedule_tokens()
        at = max((self.mixture_spans[i][1] for i in range(index) if tokens[i]), default=0.0)
        schedule = MixtureSchedule(own, 1) if own is not None else MixtureSchedule(
            self.data.default_weights, 1)
        return dict(zip(schedule.domains, schedule.weights_at(progress if own else at)))

    def _schedule_tokens(self) -> list[int]:
        """Per stage, the tokens it reads under the prepared mixture schedule: 0 for a
        stage with a mixture of its own and for a DPO stage."""
        c = self.config
        return [0 if s.kind == "dpo" or s.mixture_start or s.mixture_end
                else n * c.grad_accum * c.micro_batch * (s.seq_len + 1)
                for s, n in zip(c.stages, c.stage_steps())]

    def _spans_from(self, first: int, start: float, kept: list) -> list[tuple[float, float]]:
        """Each stage's part of the prepared mixture schedule, which runs once across the
        stages without a mixture of their own, in proportion to their tokens: ``kept``
        (the parts of the stages before ``first``), then the stages from ``first`` on
        sharing the part [start, 1]. A stage of its own mixture gets (0, 1), unused."""
        tokens = self._schedule_tokens()[first:]
        total, before, spans = sum(tokens), 0, list(kept)
        for n in tokens:
            if not n:
                spans.append((0.0, 1.0))
                continue
            # the last such stage ends at 1.0 exactly: its cumulative sum is the total
            end = 1.0 if before + n == total else start + (1.0 - start) * (before + n) / total
            spans.append((start + (1.0 - start) * before / total, end))
            before += n
        return spans

    def _resumed_spans(self, saved: list, stopped_in: int) -> list[tuple[float, float]]:
        """The saved spans up to the stage the run stopped in (its part must not move
        mid-stage), and the later stages sharing the rest of the schedule as the config
        has them now: a later stage that lost its own mixture got its saved (0, 1) and
        ran the whole schedule again; one that gained one left its part unread."""
        kept = [tuple(span) for span in saved[:stopped_in + 1]]
        tokens = self._schedule_tokens()
        start = max((kept[i][1] for i in range(len(kept)) if tokens[i]), default=0.0)
        return self._spans_from(stopped_in + 1, start, kept)

    def _open_loader(self, index: int, state: dict | None = None) -> None:
        stage = self.config.stages[index]
        n_batches = self.config.stage_steps()[index] * self.config.grad_accum
        if self.mixture_scope == "run":
            span, chunk = self.mixture_spans[index], None  # None: mixture.json's chunk size
        else:  # resumed from before: each stage the whole schedule, the loader's 1024 chunks
            span, chunk = (0.0, 1.0), 1024
        # a new stage reads on where the last LM stage's loader left the documents (a
        # restored loader has its own position)
        after = self._loader if state is None else None
        self._loader = self.data.stage_loader(stage, n_batches, self.config.micro_batch, self.rank,
                                              span, chunk, self.world, after)
        if state is not None:
            self._loader.load_state_dict(state)
        self._batches = iter(self._loader)
        self._loader_stage = index

    # --- one step ------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype is not None)

    def _micro_loss(self, index: int, stage, progress, micro: int, record: dict):
        c = self.config
        forward = self.ddp if self.ddp is not None else self.model
        if stage.kind == "dpo":
            prompt, chosen, rejected = (t.to(self.device) for t in preference_batch(
                self.data.train, c.micro_batch, *preference_lengths(stage.seq_len),
                seed=c.seed, step=self.step, micro=micro, rank=self.rank,
                weights=self._preference_weights(index, progress)))
            with self._autocast():
                loss, margin, accuracy = dpo_loss(forward, self.reference, prompt, chosen,
                                                  rejected, stage.dpo_beta)
            # the step's, as its LM loss: the micro-batches' mean, not the last one's
            for name, value in (("dpo/loss", loss.detach()), ("dpo/reward_margin", margin.mean()),
                                ("dpo/reward_accuracy", accuracy)):
                record[name] = record.get(name, 0.0) + value / c.grad_accum
            # The policy's balance losses, as in the LM stages: without them a DPO stage
            # lets the routing drift from balance (the frozen reference has its own
            # layers, so these are the policy's forward alone).
            return loss + moe_aux_loss(self.model), c.micro_batch * stage.seq_len * 2
        seq_len = self.seq_len_at(stage, progress)
        data_start = time.perf_counter()
        batch = next(self._batches)
        self._data_time += time.perf_counter() - data_start
        tokens = batch["input_ids"][:, :seq_len + 1]  # curriculum: a prefix while warming up
        names = self._loader.schedule.domains
        counts = torch.bincount(batch["domain_ids"][:, :seq_len + 1].flatten(),
                                minlength=len(names))
        for name, count in zip(names, counts.tolist()):
            self.domain_tokens[name] = self.domain_tokens.get(name, 0) + count
        tokens = tokens.to(self.device)
        with self._autocast():
            logits = forward(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        record["seq_len"] = seq_len
        record["lm_loss_sum"] = record.get("lm_loss_sum", 0.0) + loss.detach()
        return loss + moe_aux_loss(self.model), c.micro_batch * seq_len

    def train_step(self, measure: bool = False) -> dict:
        """One optimizer step. Its record holds plain numbers when ``measure`` (a logged
        step); otherwise losses and norms stay device tensors, read by nobody."""
        c = self.config
        index, stage, progress = self.stage_at(self.step)
        if stage.kind == "dpo" and self.reference_stage != index:  # each DPO stage its own
            self.reference, self.reference_stage = self._frozen_copy(), index
        if stage.kind != "dpo" and self._loader_stage != index:
            self._open_loader(index)
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for layer in self.model.moe_layers():
            layer.collect_router_entropy = measure
        record = {"stage": index, "lr": lr}
        start = time.perf_counter()
        tokens, activation = 0, [0]
        micro_stats = []  # per micro-batch, each MoE layer's stats
        self._data_time = 0.0
        for micro in range(c.grad_accum):
            last = micro == c.grad_accum - 1
            sync = self.ddp.no_sync() if (self.ddp is not None and not last) else nullcontext()
            counting = saved_activation_bytes(activation, self.model) if (measure and micro == 0) \
                else nullcontext()
            with sync, counting:
                loss, n_tokens = self._micro_loss(index, stage, progress, micro, record)
                self.scaler.scale(loss / c.grad_accum).backward()
            micro_stats.append([layer.last_stats for layer in self.model.moe_layers()])
            tokens += n_tokens
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), c.optim.grad_clip if c.optim.grad_clip > 0 else float("inf"))
        scale_before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale_before
        self.skipped_steps += int(skipped)
        self.optimizer.zero_grad(set_to_none=True)
        self._update_expert_bias(skipped)
        self.moe_stats = [step_moe_stats(stats) for stats in zip(*micro_stats)]
        for counts, stats in zip(self.load_counts, self.moe_stats):
            counts += stats.tokens_per_expert
        if measure and self.device.type == "cuda":
            # the step's kernels, not their launches: on the GPU path nothing waits for
            # them before the next step (fp16's loss scale aside)
            torch.cuda.synchronize(self.device)
        step_time = time.perf_counter() - start
        self.step += 1
        record.update(grad_norm=grad_norm, step_time_ms=1e3 * step_time,
                      tokens_per_s=tokens * self.world / step_time, skipped=bool(skipped),
                      data_time_share=self._data_time / step_time)
        if "lm_loss_sum" in record:
            record["loss"] = record.pop("lm_loss_sum") / c.grad_accum
        if stage.kind == "lm" or stage.kind == "curriculum":
            flops = training_flops_per_token(self.model, record["seq_len"]) * tokens
            record["mfu"] = flops / step_time / self.peak_flops
        if measure and self.distributed:  # the logged losses and loads: the whole batch's
            self.moe_stats = reduce_logged_step(record, self.moe_stats, self.world, self.device)
        if measure:  # device values are read (a device sync) on logged steps only
            record = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in record.items()}
            if "loss" in record:
                record["perplexity"] = perplexity_of(record["loss"])
            record["activation_mb"] = activation[0] / 2**20
        return record

    def _update_expert_bias(self, skipped: bool) -> None:
        """The aux-loss-free balancing step, on the routing counts of this step; a step
        fp16 skipped (inf/NaN gradients) drops its counts instead, as it dropped its
        update: they would bias the next step's.

        Under DDP each rank counted only its own tokens: the counts are summed over
        the ranks first, so every rank takes the same step from the whole batch's
        routing (DDP broadcasts rank 0's buffers before a step's first forward, which
        would otherwise leave the balancing to rank 0's tokens alone; the counts are
        zero everywhere then, so that broadcast loses nothing)."""
        layers = [layer for layer in self.model.moe_layers() if layer.expert_bias is not None]
        if skipped:  # the same on every rank: the gradients were all-reduced
            for layer in layers:
                layer.pending_counts.zero_()
            return
        moe_update_bias(self.model, dist.group.WORLD if self.distributed else None)

    # --- the run -------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        metrics = {k: v for k, v in record.items() if k != "skipped"}
        metrics.update(param_norm=param_norm(self.model), skipped_steps=self.skipped_steps,
                       loss_scale=self.scaler.get_scale() if self.scaler.is_enabled() else 1.0,
                       peak_memory_mb=peak_memory_bytes(self.device) / 2**20)
        moe, _ = moe_metrics(self.model, self.moe_stats)  # this step's, every micro-batch
        metrics.update(moe)
        total = sum(self.domain_tokens.values())
        for domain, count in self.domain_tokens.items():
            metrics[f"domain_share/{domain}"] = count / total
        self.domain_tokens = {}  # shares are per logging window
        if self.compression is not None:
            stats = self.compression.stats
            metrics.update(comm_bytes=stats.bytes_sent, comm_ratio=stats.compression_ratio,
                           compression_error=stats.relative_error if stats.value_sq is not None
                           else None)
            stats.reset()  # per logging window, as the domain shares: not the whole run's
        self.logger.log(self.step, metrics)

    def state_dict(self) -> dict:
        """This rank's whole state; save() keeps the parts in ckpt.RANK_KEYS per rank."""
        return {"step": self.step, "world": self.world, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": ckpt.rng_state(), "skipped_steps": self.skipped_steps,
                "reference": self.reference.state_dict() if self.reference is not None else None,
                "reference_stage": self.reference_stage,
                "compression": self.compression.state_dict() if self.compression else None,
                "domain_tokens": dict(self.domain_tokens), "load_counts": self.load_counts,
                "loader": ({"stage": self._loader_stage, "state": self._loader.state_dict()}
                           if self._loader is not None else None),
                "config": self.config.to_dict(), "data": self.data.fingerprint,
                "mixture_scope": self.mixture_scope,
                "mixture_spans": [list(span) for span in self.mixture_spans]}

    def load_state_dict(self, state: dict) -> None:
        if state["config"]["model"] != self.config.model or \
                state["config"]["model_overrides"] != self.config.model_overrides:
            raise ValueError(f"the checkpoint in {self.out_dir} was trained with model "
                             f"{state['config']['model']!r} {state['config']['model_overrides']}, "
                             f"this config asks for {self.config.model!r} "
                             f"{self.config.model_overrides}: use another out_dir")
        # Before the weights: another tokenizer's vocabulary would fail there as a raw
        # size mismatch, and one of the same size would load and train on other ids.
        ckpt.check_data(self.out_dir, state.get("data"), self.data.fingerprint)
        self._check_vocab(state["model"])
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        # The saved groups' hyperparameters come back with it; a resume reports a changed
        # weight_decay or betas as applied from here on, so the config's are (lr is set
        # every step). The no-decay group keeps 0.
        decay_groups = [group["weight_decay"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, weight_decay in zip(self.optimizer.param_groups, decay_groups):
            group["weight_decay"], group["betas"] = weight_decay, tuple(self.config.optim.betas)
        if state["scaler"]:  # empty when saved without a loss scale (fp32, bf16): a fresh one
            self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.skipped_steps = state["skipped_steps"]
        if state["reference"] is not None:  # a later DPO stage freezes its own
            self.reference = self._frozen_copy(state["reference"])
        # A checkpoint from before references were kept per stage holds at most one,
        # frozen for the stage it stopped in (a DPO stage, or it would hold none).
        last_step = min(self.step, self.config.steps - 1)
        self.reference_stage = state.get(
            "reference_stage", -1 if state["reference"] is None else self.stage_at(last_step)[0])
        if self.compression is not None and state["compression"] is not None:
            self.compression.load_state_dict(state["compression"], self.device)
            # the checkpoint's start_iter is the old config's: a changed compress_start_iter
            # is reported as applied "from here on", so it is
            self.compression.start_iter = self.config.compress_start_iter
        self.domain_tokens = dict(state["domain_tokens"])
        self.load_counts = [counts.to(self.device, torch.int64)  # older checkpoints: fp32
                            for counts in state["load_counts"]]
        self.mixture_scope = state.get("mixture_scope", "stage")
        spans = state.get("mixture_spans")  # none: saved before they were kept (as now)
        if spans is not None and len(spans) == len(self.config.stages):
            loader = state["loader"]
            self.mixture_spans = self._resumed_spans(spans, -1 if loader is None
                                                     else loader["stage"])
        if state["loader"] is not None:
            self._open_loader(state["loader"]["stage"], state["loader"]["state"])

    def _check_vocab(self, weights: dict) -> None:
        """A checkpoint from before data fingerprints, on data of another vocabulary."""
        saved = weights["embed.weight"].shape[0]
        if saved != self.data.vocab_size:
            raise ValueError(f"the checkpoint in {self.out_dir} was trained on a vocabulary of "
                             f"{saved} tokens, the data has {self.data.vocab_size} (another "
                             f"tokenizer): pass --no-resume to start over there, --out NEW_DIR "
                             f"to keep it, or --data the data it was trained on")

    def save(self) -> None:
        """Every rank calls it (each saves its own part; see checkpoint.py)."""
        ckpt.save_state(self.out_dir, self.state_dict(), self.rank,
                        dist.barrier if self.distributed else None)

    def _stop(self, signum: int, saved: bool) -> None:
        """Ends the run on a signal after this step: the regular checkpoint (unless this
        step's periodic save wrote it), no export or report (the run is not finished)."""
        if not saved:
            self.save()
        self.logger.close()
        raise TrainingStopped(self.step, self.config.steps, self.out_dir,
                              signal.Signals(signum).name)

    def _load_agreed_state(self) -> dict | None:
        """This rank's checkpoint state, once every rank has found the same step. Ranks
        that do not share out_dir (one disk per node) would otherwise resume apart:
        one from its step, another from scratch, their replicas diverging until the
        longer run waits forever in a collective. Each rank's finding (or its error) is
        gathered, and all raise the same error where they differ."""
        if not self.distributed:
            return ckpt.load_state(self.out_dir, self.rank, self.world)
        state, failure = None, None
        try:
            state = ckpt.load_state(self.out_dir, self.rank, self.world)
            finding = f"step {state['step']}" if state is not None else "no checkpoint"
        except Exception as error:  # perhaps on this rank alone (a bad file): tell the others
            failure, finding = error, f"{type(error).__name__}: {error}"
        findings = [None] * self.world
        dist.all_gather_object(findings, finding)
        if len(set(findings)) > 1:
            seen = "; ".join(f"rank {r}: {f}" for r, f in enumerate(findings))
            raise ValueError(f"the ranks cannot resume from {self.out_dir} together ({seen}): "
                             "every rank must see the same out_dir (a shared filesystem), "
                             "or pass --no-resume to start over") from failure
        if failure is not None:  # every rank failed alike: its own error says it best
            raise failure
        return state

    def train(self, resume: bool = True, progress: bool = True) -> list[dict]:
        """Runs the remaining steps; returns the run's metrics records (a resumed run's
        from its start, those before the checkpoint included)."""
        c = self.config
        if not resume:  # starting over: the old run must not be resumed if this one stops
            if self.rank == 0:
                ckpt.remove_run(self.out_dir)
            if self.distributed:  # before any rank saves into the directory
                dist.barrier()
        state = self._load_agreed_state() if resume else None
        if state is not None:
            self.load_state_dict(state)
        self.logger.start(fresh=state is None, step=self.step)
        first_step = self.step
        bar = tqdm(total=c.steps, initial=self.step, disable=not progress or self.rank != 0,
                   desc="train", unit="step", dynamic_ncols=True)
        loop_start = time.perf_counter()
        # The handlers stay through the final save and the export: from the last step on
        # a signal lets the run finish (stop.py), and a first Ctrl-C does not cut the
        # export short.
        # The bar shows the stage of the step just taken and the last logged loss, with
        # its step: a loss is read only on logged steps (reading it waits for the device).
        postfix = {"stage": "", "loss": "not logged yet"}
        with StopRequests(self._stop_group, self.distributed, announce=self.rank == 0) as stop:
            while self.step < c.steps:
                stop.finishing = self.step + 1 == c.steps
                measure = (self.step + 1) % c.log_every == 0 or self.step + 1 == c.steps
                record = self.train_step(measure=measure)
                if measure:
                    self._log(record)
                    loss = record.get("loss", record.get("dpo/loss", float("nan")))
                    postfix["loss"] = f"{loss:.3f} (step {self.step})"
                postfix["stage"] = c.stages[record["stage"]].name
                bar.set_postfix(postfix, refresh=False)  # shown with the update below
                saved = bool(c.save_every) and self.step % c.save_every == 0
                if saved:
                    self.save()
                bar.update(1)
                # A stop asked during the last step is not one: the run finishes as usual.
                signum = stop.requested() if self.step < c.steps else 0
                if signum:
                    bar.close()
                    self._stop(signum, saved)
            stop.finishing = True
            bar.close()
            self.loop_seconds = time.perf_counter() - loop_start  # steps, logging, data
            self._finish(trained=self.step > first_step, fresh=state is None)
        return self.logger.history

    def _finish(self, trained: bool, fresh: bool) -> None:
        """The end of the run: the checkpoint, the exported model (final/) and the report.
        A finished run started again trains nothing: its checkpoint (and the config it
        was trained with), its export and its report stand, but for a part that is
        missing (e.g. an export cut short: each file is written whole or not at all)."""
        c = self.config
        if trained or fresh:
            self.save()
        self.logger.close()
        tokenizer = self.data.tokenizer_path
        if self.rank == 0 and (trained or not ckpt.exported(self.out_dir, tokenizer is not None)):
            ckpt.export_model(self.out_dir, self.model, tokenizer)
            if tokenizer is not None:
                ckpt.export_heldout(self.out_dir / "final" / "heldout.jsonl", self.data.val,
                                    tokenizer, self.data.train.eos_id)
        # Its report stands too (it may hold an evaluation `dsv3 report` added), unless
        # it never got one. Its heat map counts every rank's tokens.
        load_counts = summed_over_ranks(self.load_counts) if self.distributed else self.load_counts
        if self.rank == 0 and (trained or not reported(self.out_dir)):
            losses = [r["loss"] for r in self.logger.history if "loss" in r]
            write_report(self.out_dir, load_counts, summary={
                "steps": self.step, "stages": ", ".join(s.name for s in c.stages),
                "parameters": self.model.num_parameters(),
                "active parameters": self.model.num_parameters(active=True),
                "precision": c.precision, "checkpointing": c.checkpointing,
                "first / last logged LM loss": (f"{losses[0]:.4f} / {losses[-1]:.4f}"
                                                if losses else "n/a")})

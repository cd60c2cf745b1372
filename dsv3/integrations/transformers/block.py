"""``TransformersMoE``: the dsv3.MoE that ``patch_moe`` puts where a transformers sparse
MoE block was.

It is a dsv3.MoE (fused routing and experts on dsv3's ops, same Parameters as the
block it replaces) plus the parts of the HF block that dsv3.MoE does not have:

- Qwen2-MoE's (and Qwen3-Next's, Qwen3.5-MoE's) gated shared expert,
  ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``, kept as the HF modules and added
  after the routed experts. Plain shared experts (DeepSeek-V3's and alike) go through
  dsv3.MoE's own shared-expert slot, again as the HF module: its gate and up projections
  are separate Linears, and fusing them would need a copy.
- router_logits for ``output_router_logits`` (the models' load-balancing aux loss).
  transformers records them with forward hooks on modules of the router class, so
  the block owns a tap: an instance of a subclass of that router class whose forward
  is the identity on logits. It is the submodule ``gate``, the name most HF blocks give
  their router, because some recorders also filter by module name (MiniMax's records
  only modules under "mlp.gate"). Only when a hook sits on it (i.e. the
  model was asked for router_logits) does the block compute the logits for it, once
  more, outside dsv3.MoE's fused router: a [T, D] x [D, E] matmul, small next to the
  experts. The logits are fp32 (dsv3 routes in fp32), where Mixtral and Qwen record
  them in the model dtype; in fp32 models they are the same.
- Mixtral's (and MiniMax's) router jitter (training only, off by default): the same
  draws as HF's from the same RNG state, applied out of place (HF scales the block's
  input in place).

dsv3.MoE's own load-balance and z-losses are switched off (coef 0): the HF model
computes its aux loss from router_logits, as before the patch. The output is the
tensor the HF block returned, same shape and dtype.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.moe import MoE, MoEConfig


@functools.cache
def logits_tap_class(router_cls: type) -> type:
    """A subclass of ``router_cls`` with no parameters whose forward returns its input."""

    def __init__(self):
        nn.Module.__init__(self)  # not router_cls.__init__: the tap owns no weights

    def forward(self, logits_TE):
        return logits_TE

    def __reduce_ex__(self, protocol):
        # Pickle finds classes by module and name, and this one is made here, not
        # defined there: rebuild it from the router class instead (torch.save(model)).
        return _new_tap, (router_cls,), self.__getstate__()

    return type(f"{router_cls.__name__}LogitsTap", (router_cls,),
                {"__init__": __init__, "forward": forward, "__reduce_ex__": __reduce_ex__,
                 "__module__": __name__,
                 "__doc__": f"Where transformers' router_logits hooks observe a "
                            f"dsv3 block that replaced a {router_cls.__name__}."})


def _new_tap(router_cls: type) -> nn.Module:
    """An empty tap for unpickling, which then restores its state."""
    tap_class = logits_tap_class(router_cls)
    return tap_class.__new__(tap_class)


class TransformersMoE(MoE):
    """Build with ``from_module(hf_block)``: created on the meta device, then handed the
    block's own Parameters and modules."""

    def __init__(self, config: MoEConfig, *, architecture, hf_config, router_cls: type,
                 dtype: torch.dtype, jitter_noise: float = 0.0):
        super().__init__(config, device="meta", dtype=dtype)
        self.architecture = architecture
        self.hf_config = hf_config  # to rebuild the HF block in to_module
        self.jitter_noise = jitter_noise
        self.gate = logits_tap_class(router_cls)()  # named for the recorders: see above
        self.shared_expert = self.shared_expert_gate = None

    def set_routing_bias(self, bias_E: torch.Tensor) -> None:
        """Use ``bias_E`` (a fixed buffer, e.g. DeepSeek-V3's e_score_correction_bias) to
        choose experts. It stays a buffer of this module, shared with the HF router's,
        and is moved only by whoever moved it before (update_bias() does not: the
        config's bias_update_rate is 0)."""
        del self.expert_bias  # a plain None attribute when bias_update_rate is 0
        self.register_buffer("expert_bias", bias_E)
        # dsv3.MoE counts routed copies for update_bias() whenever a bias is present.
        self.register_buffer("pending_counts", torch.zeros_like(bias_E, dtype=torch.int64),
                             persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        if self.gate._forward_hooks:  # transformers is recording router_logits
            x_TD = x.reshape(-1, self.config.dim)
            self.gate(F.linear(x_TD.float(), self.router.weight.float()))
        y = super().forward(x)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y

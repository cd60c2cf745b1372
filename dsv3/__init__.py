"""dsv3: a Mixture-of-Experts engine for PyTorch whose hot paths are its own kernels.

    moe = dsv3.MoE(dsv3.MoEConfig(dim=512, ffn_dim=1024, n_experts=8, top_k=2))
    y = moe(x)
    loss = task_loss + dsv3.moe_aux_loss(model)
"""
from dsv3 import ops, reference
from dsv3.moe import MoE, MoEConfig, MoEStats, moe_aux_loss, moe_update_bias

__version__ = "0.1.0"
__all__ = ["MoE", "MoEConfig", "MoEStats", "moe_aux_loss", "moe_update_bias", "ops", "reference"]

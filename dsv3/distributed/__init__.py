"""dsv3.distributed: scale-out on torch.distributed (gloo on CPU, NCCL on GPU),
launched with torchrun.

- ``compressed_all_reduce`` / ``int8_compress_hook``: gradients all-reduced as
  int8 blocks with error feedback, about a quarter of fp32's bytes on the wire;
- expert parallelism: ``dsv3.MoE(config, ep_group=group)`` shards the experts over
  ``group`` and moves tokens with ``all_to_all_single`` (see expert_parallel.py).
"""
from dsv3.distributed.compress import (CompressionState, CompressionStats,
                                       compressed_all_reduce)
from dsv3.distributed.ddp_hook import int8_compress_hook
from dsv3.distributed.expert_parallel import ddp_ignore_expert_parameters

__all__ = ["CompressionState", "CompressionStats", "compressed_all_reduce", "int8_compress_hook",
           "ddp_ignore_expert_parameters"]

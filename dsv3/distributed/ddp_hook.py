"""DDP communication hook around compressed_all_reduce:

    state = dsv3.distributed.CompressionState(process_group=None, start_iter=10)
    model.register_comm_hook(state, dsv3.distributed.int8_compress_hook)

DDP calls the hook once per gradient bucket, only on steps that synchronize, so
gradient accumulation under ``model.no_sync()`` needs nothing special: the
residuals carry over between synchronizing steps. Under AMP the bucket holds the
gradients in their own dtype; they are quantized from fp32 and written back.
"""
import torch
import torch.distributed as dist

from dsv3.distributed.compress import CompressionState, compressed_all_reduce


def int8_compress_hook(state: CompressionState,
                       bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Averages the bucket's gradients across the DDP group through int8 blocks.

    The collectives run when DDP hands the bucket over and the returned future is
    already complete: simple, but the backward waits for them (no overlap of this
    bucket's communication with later buckets' gradients)."""
    tensor = bucket.buffer()
    compressed_all_reduce(tensor, state, average=True, key=_bucket_key(bucket))
    if bucket.is_last():
        state.step()
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(tensor)
    return future


def _bucket_key(bucket: dist.GradBucket) -> tuple:
    """The bucket's index and its parameters' shapes. DDP rebuilds its buckets after the
    first step, and a restarted run begins with the first layout again: keyed by the
    index alone, a saved residual could land on another bucket of the same size, on
    other parameters' gradients. With the shapes it returns only to its own
    parameters, or is started afresh."""
    return (bucket.index(), tuple(tuple(p.shape) for p in bucket.parameters()))

"""dsv3.distributed on real process groups: gloo over 127.0.0.1, 2 and 4 ranks
(tests/distributed_workers.py holds what each rank runs and checks)."""
import pytest
import torch

import distributed_workers as workers
from rank_runner import run_ranks


@pytest.mark.parametrize("world", [2, 4])
def test_compressed_all_reduce_error_bounds(world):
    run_ranks(world, workers.check_compressed_all_reduce)


def test_a_state_shared_by_two_models_is_warned_about():
    run_ranks(2, workers.check_shared_state_warns)


def test_error_feedback_and_checkpointed_state():
    run_ranks(2, workers.check_error_feedback)


def test_size_mismatch_and_dead_rank_give_clear_errors():
    run_ranks(2, workers.check_failures, collective_timeout=10)


def test_local_errors_and_divergent_states_are_named():
    run_ranks(2, workers.check_local_errors_and_divergent_states, collective_timeout=10)


def test_block_size_disagreement_is_named_and_fp64_warm_up_is_exact():
    run_ranks(2, workers.check_block_sizes_and_fp64_warm_up, collective_timeout=10)


def test_expert_parallel_misuse_is_named():
    run_ranks(2, workers.check_expert_parallel_misuse_is_named, collective_timeout=10)


def test_trainer_compression_figures_per_window_and_start_iter_on_resume(tmp_path):
    run_ranks(2, workers.check_compression_settings_on_resume, str(tmp_path))


def test_resume_at_another_world_size_drops_the_residuals(tmp_path):
    run_ranks(4, workers.save_compression_state, str(tmp_path))
    run_ranks(2, workers.check_resume_at_another_world_size, str(tmp_path))


def test_restart_frees_the_initial_bucket_residual():
    run_ranks(2, workers.check_restart_frees_stale_residuals)


def test_ddp_hook_trains_like_fp32():
    run_ranks(2, workers.check_ddp_hook_training, timeout=300)


def test_ddp_hook_with_accumulation_and_autocast():
    run_ranks(2, workers.check_ddp_hook_accumulation_and_amp)


EP_CONFIGS = {
    # Mixtral-style softmax top-2.
    "softmax": dict(dim=16, ffn_dim=24, n_experts=8, top_k=2, aux_loss_coef=0.0),
    # DeepSeek-V3-style: sigmoid, groups, scale, bias, a shared expert.
    "deepseek": dict(dim=16, ffn_dim=24, n_experts=8, top_k=3, score="sigmoid", n_groups=4,
                     topk_groups=2, route_scale=2.5, n_shared_experts=1, aux_loss_coef=0.0,
                     bias_update_rate=1e-3),
    # GLM-5-Next-style clamped SwiGLU, the limit low enough to clamp ~40% of the values.
    "clamped": dict(dim=16, ffn_dim=24, n_experts=8, top_k=2, aux_loss_coef=0.0,
                    n_shared_experts=1, swiglu_limit=0.5),
}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("config", EP_CONFIGS, ids=list(EP_CONFIGS))
def test_expert_parallel_equals_single_process(world, config):
    run_ranks(world, workers.check_expert_parallel, EP_CONFIGS[config])


def test_expert_parallel_rank_with_no_tokens():
    config = dict(EP_CONFIGS["softmax"], bias_update_rate=1e-3)
    run_ranks(2, workers.check_expert_parallel, config, True)


def test_expert_parallel_rank_with_an_empty_batch():
    """A rank with no tokens used to raise ValueError alone while the others waited in
    the all-to-all until the collective timeout."""
    run_ranks(2, workers.check_expert_parallel, EP_CONFIGS["deepseek"], False, 0,
              collective_timeout=10)


def test_plain_ddp_with_a_rank_whose_batch_is_empty():
    run_ranks(2, workers.check_plain_ddp_with_an_empty_rank, collective_timeout=10)


def test_expert_parallel_layer_under_ddp():
    run_ranks(2, workers.check_expert_parallel_under_ddp, collective_timeout=10)


@pytest.mark.parametrize("world, ep_size", [(2, 2), (4, 2)], ids=["ep=world", "replicated"])
def test_expert_parallel_grads_under_ddp_equal_plain_ddp(world, ep_size):
    run_ranks(world, workers.check_expert_parallel_grads_under_ddp, ep_size)


@pytest.mark.parametrize("compress", [False, True], ids=["fp32", "int8"])
def test_trainer_under_ddp(tmp_path, compress):
    run_ranks(2, workers.check_trainer_ddp, str(tmp_path), compress)


def test_a_bucket_residual_returns_only_to_a_bucket_of_the_same_parameters():
    """DDP rebuilds its buckets once and a restart begins with the first layout: a
    saved residual must not land on another bucket that happens to share its index
    and size but holds other parameters."""
    from types import SimpleNamespace

    from dsv3.distributed.ddp_hook import _bucket_key

    def bucket(index, *shapes):
        params = [torch.zeros(shape) for shape in shapes]
        return SimpleNamespace(index=lambda: index, parameters=lambda: params)

    same_size_other_params = (bucket(0, (4, 8), (32,)), bucket(0, (8, 8)))
    assert _bucket_key(same_size_other_params[0]) != _bucket_key(same_size_other_params[1])
    assert _bucket_key(bucket(1, (8, 8))) == _bucket_key(bucket(1, (8, 8)))


@pytest.mark.gpu
def test_compressed_all_reduce_makes_no_host_sync_on_a_gpu(tmp_path):
    """The DDP hook reduces every bucket through compressed_all_reduce: a host read
    there (the ranks' agreement check once read the gathered sizes) stalls the backward
    at each bucket until the communication before it is done. One rank on NCCL; the
    warm-up call lets NCCL set up its communicator first."""
    import torch.distributed as dist
    from dsv3.distributed import CompressionState, compressed_all_reduce
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        state = CompressionState(start_iter=0)
        grad_N = torch.randn(4096, device="cuda")
        expected_N = grad_N.clone()
        compressed_all_reduce(grad_N, state, average=True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            compressed_all_reduce(grad_N, state, average=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(grad_N, expected_N)  # the mean over one rank
    finally:
        dist.destroy_process_group()


_DISAGREEING_RANKS_SCRIPT = """
import sys, torch, torch.distributed as dist
from dsv3.distributed import CompressionState, compress, compressed_all_reduce
dist.init_process_group("nccl", init_method="file://" + sys.argv[1], rank=0, world_size=1)
collective = compress._collective
def disagreeing(fn, *args, **kwargs):  # the agreement check's gather, as if a rank held 7
    # (its 5 values: numel, compressing, iteration, start_iter, block_size)
    result = collective(fn, *args, **kwargs)
    if fn is dist.all_gather and args[1].numel() == 5:
        args[0][0][0] = 7
    return result
compress._collective = disagreeing
try:
    compressed_all_reduce(torch.randn(4096, device="cuda"), CompressionState(start_iter=0))
    torch.cuda.synchronize()
    print("no error")
except RuntimeError as error:
    print("raised:", error)
"""


@pytest.mark.gpu
def test_ranks_disagreeing_on_a_gpu_stop_at_a_device_assert(tmp_path):
    """The GPU side of the agreement check: gathered sizes that differ stop the call at a
    device-side assert (in a subprocess: the assert ends its CUDA context)."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", _DISAGREEING_RANKS_SCRIPT,
                             str(tmp_path / "store")], capture_output=True, text=True, timeout=300)
    assert "raised:" in result.stdout and "assert" in result.stdout.lower(), (
        result.stdout + result.stderr)

"""dsv3's model under FSDP2 (fully_shard per decoder block) on a real process group
(gloo over 127.0.0.1, 2 ranks; tests/fsdp_workers.py holds what each rank checks):
it trains as one process on every rank's batch, expert-selection biases included."""
import fsdp_workers as workers
from rank_runner import run_ranks


def test_fsdp2_sharded_blocks_train_as_one_process():
    run_ranks(2, workers.check_fsdp2_matches_one_process, timeout=300)

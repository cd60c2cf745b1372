"""dsv3.train under DDP on real process groups (gloo over 127.0.0.1, 2 ranks;
tests/train_ddp_workers.py holds what each rank runs and checks): a resumed run
continues every rank's own run bit for bit, and ranks that would resume from
different checkpoints all refuse; the expert-bias balancing, the logged metrics and
the report's heat map count every rank's tokens; a signal to one rank stops every
rank after the same step."""
import pytest

import train_ddp_workers as workers
from rank_runner import run_ranks


@pytest.mark.parametrize("stop", [1, 3])  # before / after the int8 compression starts
def test_ddp_resume_continues_every_ranks_run(tmp_path, stop):
    run_ranks(2, workers.check_ddp_resume, str(tmp_path), stop, timeout=300)


def test_ddp_resume_refused_where_ranks_find_different_checkpoints(tmp_path):
    run_ranks(2, workers.check_ddp_resume_needs_one_out_dir, str(tmp_path), timeout=300)


def test_ddp_expert_bias_steps_from_every_ranks_counts(tmp_path):
    run_ranks(2, workers.check_ddp_expert_bias, str(tmp_path), timeout=300)


def test_ddp_logged_metrics_and_heat_map_cover_every_rank(tmp_path):
    run_ranks(2, workers.check_ddp_metrics_cover_every_rank, str(tmp_path), timeout=300)


def test_ddp_a_signal_to_one_rank_stops_every_rank_at_one_step(tmp_path):
    run_ranks(2, workers.check_ddp_stop_on_one_ranks_signal, str(tmp_path), timeout=300)

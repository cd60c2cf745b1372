"""Stopping a run on Ctrl-C (SIGINT) or a scheduler's SIGTERM without losing it.

While the trainer's loop runs, the first such signal only sets a flag. At the next
optimizer-step boundary the trainer writes its regular checkpoint (the one a periodic
``save_every`` save writes, so the resume is exact) and raises ``TrainingStopped``;
``dsv3 train`` turns that into exit status 128 + the signal's number (130 for Ctrl-C,
143 for SIGTERM, as a shell reports a command a signal ended) and one line saying how
to resume. A second Ctrl-C stops at once, as before (a raw ``KeyboardInterrupt``,
nothing saved since the last checkpoint); a second SIGTERM changes nothing (the
scheduler's SIGKILL ends a run that takes too long). The handlers are installed only
in the main thread (Python delivers signals there alone), not over a signal that is
ignored (``SIG_IGN``: a script's ``dsv3 train &`` is started with SIGINT ignored, and
stays so), and the previous ones come back afterwards.

A signal that arrives during the last step, or after it, while the run saves its
final checkpoint and exports the model (final/), does not stop the run: the run
finishes, which stops it as soon, and the message says so. The handlers stay
installed until the export is written, so a first Ctrl-C there does not cut it short;
a second one does, and the run started again makes the export (its files are written
whole or not at all, see checkpoint.py).

Under DDP (torchrun) the ranks must stop after the same step: a rank that stopped
alone would leave the others waiting in the next step's all-reduce, and their
checkpoint files would be of different steps. So every step the ranks combine their
flags with one all-reduce of a single integer. It runs on the CPU (the default group
under gloo; a gloo side group under NCCL): a device tensor would need a host-device
sync per step to read, which the trainer avoids on steps that are not logged. One
small CPU collective per step costs well under a millisecond beside a step's
gradient all-reduce. (Honouring the signal only at save boundaries needs no
collective but could wait ``save_every`` steps, and forever with ``save_every = 0``.)

torchrun forwards the Ctrl-C it gets to its workers, which also got it from the
terminal: the same signal twice within ``REPEAT_WINDOW_S`` is one request, not the
"second Ctrl-C" that stops at once. torchrun also SIGKILLs its workers a while after
forwarding a signal: 30 seconds unless raised with ``torchrun --shutdown-timeout S``
(or the environment variable ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT=S``; torch 2.14's
torchrun has both: one whose ``--help`` lacks them keeps its 30 s). If finishing
the current step and writing the checkpoint takes longer than that, the workers die
before the stop's checkpoint is complete: the run resumes from the previous one (its
files are replaced only when whole), and the steps since are trained again. Give it
the time of a step plus a save, and a scheduler's grace period (e.g. SLURM's, before
its SIGKILL) at least as much."""
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_WINDOW_S = 1.0  # a repeat inside it is the same Ctrl-C delivered twice (torchrun)


class TrainingStopped(KeyboardInterrupt):
    """The run stopped on a signal after saving its checkpoint at ``step``. A
    KeyboardInterrupt: a script that does not expect it stops as it did on Ctrl-C
    (rather than go on to evaluate a half-trained model), and ``except Exception``
    does not swallow it."""

    def __init__(self, step: int, steps: int, out_dir, signal_name: str):
        super().__init__(f"stopped by {signal_name} at step {step} of {steps}; checkpoint "
                         f"saved in {out_dir}")
        self.step, self.steps, self.out_dir, self.signal_name = step, steps, out_dir, signal_name

    def __reduce__(self):  # pickle and copy: BaseException's would pass the message alone
        return type(self), (self.step, self.steps, self.out_dir, self.signal_name)

    @property
    def signum(self) -> int:
        """The signal's number (``dsv3 train`` exits with 128 + it)."""
        return int(signal.Signals[self.signal_name])


class StopRequests:
    """A context manager around the training loop: catches SIGINT/SIGTERM as a
    request to stop (see the module docstring); ``requested()`` is the signal every
    rank agrees on after a step (0: none)."""

    def __init__(self, group=None, distributed: bool = False, announce: bool = True):
        self.group, self.distributed, self.announce = group, distributed, announce
        self.signum = 0
        # Set by the trainer from its last step on: a signal then does not stop the run
        # early, the run finishes (step, checkpoint, export), and the message says so.
        self.finishing = False
        self._first_at = 0.0
        self._previous: dict = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) is signal.SIG_IGN:  # ignored by who started us
                    continue
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.signum:
            self.signum, self._first_at = signum, now
            name = signal.Signals(signum).name
            if self.announce and self.finishing:
                print(f"\ndsv3 train: {name}: the run is finishing (its last step, checkpoint "
                      f"and export); Ctrl-C again to stop at once (the same command then "
                      f"finishes it)", file=sys.stderr, flush=True)
            elif self.announce:
                print(f"\ndsv3 train: {name}: stopping after this step with a checkpoint "
                      f"(Ctrl-C again to stop at once, without one)", file=sys.stderr, flush=True)
            return
        if signum == signal.SIGINT and now - self._first_at >= REPEAT_WINDOW_S:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, as before

    def requested(self) -> int:
        """The signal that asks this step to be the last (0: none), the same on every
        rank: the largest any rank caught."""
        if not self.distributed:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())


def control_group():
    """The CPU process group for the per-step stop flag: the default group when it
    is gloo, else a gloo side group (NCCL would need device tensors). Every rank
    must call it, in the same order (it may create a group)."""
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")

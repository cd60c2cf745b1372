"""Package-level contracts: ``import dsv3`` works in a fresh interpreter and without
triton, the public names exist, and DSV3_BACKEND=reference routes every op (and
the layer) to the reference path without touching a compiled kernel."""
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dsv3
from conftest import assert_close, make_experts
from dsv3 import ops, reference

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DSV3_BACKEND", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_import_in_fresh_interpreter():
    """``import dsv3`` must work as a user's first import (torch not yet loaded)."""
    result = run_python("import dsv3; print(dsv3.__version__)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == dsv3.__version__


def test_import_and_run_without_triton():
    """A CPU install has no triton: block it and run a tiny MoE forward and backward.
    (torch is imported first so this test isolates the triton dependency.)"""
    result = run_python("""
        import importlib.abc, sys

        class BlockTriton(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "triton":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, BlockTriton())
        sys.modules["triton"] = None  # as if not installed, also for importlib.util.find_spec

        import torch
        import dsv3
        moe = dsv3.MoE(dsv3.MoEConfig(dim=16, ffn_dim=32, n_experts=4, top_k=2))
        x = torch.randn(2, 5, 16, requires_grad=True)
        y = moe(x)
        y.sum().backward()
        assert y.shape == x.shape and x.grad is not None
        assert sys.modules["triton"] is None, "something imported triton anyway"
        print("ok")
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


def test_triton_backend_replaces_the_cpu_kernels():
    """DSV3_BACKEND=triton: every op with a Triton kernel runs it on CPU tensors (the C++
    kernel stays registered but inactive); ops without one keep their C++ kernel."""
    result = run_python("""
        import os
        os.environ.update(DSV3_BACKEND="triton", TRITON_INTERPRET="1")
        import torch, dsv3
        from dsv3.ops.triton_backend import TRITON_KERNELS
        for name in [*TRITON_KERNELS, "dsv3::expert_index"]:
            dump = torch._C._dispatch_dump(name)
            cpu_cpp_inactive = "CPU (inactive): registered at" in dump and "csrc/cpu" in dump
            print(name, cpu_cpp_inactive)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    status = dict(line.split() for line in result.stdout.strip().splitlines())
    assert status.pop("dsv3::expert_index") == "False"
    assert set(status.values()) == {"True"}, status


def test_triton_backend_on_cpu_without_the_interpreter_says_what_to_set():
    pytest.importorskip("triton")
    result = run_python("""
        import os
        os.environ["DSV3_BACKEND"] = "triton"
        os.environ.pop("TRITON_INTERPRET", None)
        import torch, dsv3
        dsv3.ops.route(torch.randn(4, 8), 2)
    """)
    assert result.returncode != 0
    assert "set TRITON_INTERPRET=1" in result.stderr and "DSV3_BACKEND=auto" in result.stderr


def test_triton_kernels_launch_on_their_tensors_gpu(monkeypatch):
    """Triton launches on the current CUDA device: the registered CUDA kernels switch
    to their tensors' device first, and only when it is another one. (A stand-in for
    a cuda:1 tensor: this machine may have no GPU, and the GPU check has one.)"""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from dsv3.ops import triton_backend
    entered = []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("left")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Device)
    kernel = triton_backend.on_tensors_device(lambda *args, **kwargs: (entered.copy(), kwargs))
    on = {index: SimpleNamespace(is_cuda=True, device=torch.device("cuda", index))
          for index in (0, 1)}
    assert kernel(3, on[1], scale=2.0) == ([torch.device("cuda", 1)], {"scale": 2.0})
    assert entered == [torch.device("cuda", 1), "left"]
    entered.clear()
    assert kernel(on[0], on[1]) == ([], {})  # already current: no switch
    assert kernel(torch.zeros(2), None) == ([], {})  # no CUDA tensor (the interpreter)
    assert entered == []
    # And register() installs every Triton kernel for CUDA through it.
    registered = {}
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda *a: False)
    monkeypatch.setattr(torch.library, "register_kernel",
                        lambda name, device, fn: registered.setdefault((name, device), fn))
    triton_backend.register()
    for name, kernel in triton_backend.TRITON_KERNELS.items():
        assert registered[(name, "cuda")].__wrapped__ is kernel, name


def test_public_names():
    for name in dsv3.__all__:
        assert hasattr(dsv3, name), name
    for name in ops.__all__:
        assert hasattr(ops, name), name
    for op in ("route", "route_backward", "expert_index", "permute_rows", "unpermute",
               "unpermute_backward", "grouped_mm", "grouped_mm_wgrad", "swiglu",
               "swiglu_backward", "gpt_oss_glu", "gpt_oss_glu_backward"):
        assert hasattr(torch.ops.dsv3, op), op


class OpLog(TorchDispatchMode):
    """Records the name of every op dispatched while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))

    def dsv3_ops(self):
        return sorted({n for n in self.names if n.startswith("dsv3::")})


def run_every_op():
    """Forward and backward through every public op; returns outputs and grads."""
    logits_TE = torch.randn(16, 8, requires_grad=True)
    x_TD = torch.randn(16, 12, requires_grad=True)
    w_EXY = torch.randn(8, 12, 20, requires_grad=True)
    weights_TK, experts_TK, counts_E = ops.route(logits_TE, 2, "sigmoid", torch.randn(8), 2, 1)
    offsets_E, _ = ops.expert_index(experts_TK, 8)
    x_SD, offsets_E, row_map_TK = ops.permute(x_TD, experts_TK, 8)
    h_SY = ops.grouped_mm(x_SD, w_EXY, offsets_E)
    y_TD = ops.unpermute(ops.swiglu(h_SY), row_map_TK, weights_TK)
    y_TD.square().sum().backward()
    return [y_TD, weights_TK, experts_TK, counts_E, offsets_E, row_map_TK,
            logits_TE.grad, x_TD.grad, w_EXY.grad]


def test_auto_backend_runs_the_kernels():
    with OpLog() as log:
        run_every_op()
    assert log.dsv3_ops() == ["dsv3::expert_index", "dsv3::grouped_mm", "dsv3::grouped_mm_wgrad",
                              "dsv3::permute_rows", "dsv3::route", "dsv3::route_backward",
                              "dsv3::swiglu", "dsv3::swiglu_backward", "dsv3::unpermute",
                              "dsv3::unpermute_backward"]


def test_reference_backend_skips_the_kernels(monkeypatch):
    torch.manual_seed(0)
    kernel = run_every_op()
    monkeypatch.setenv("DSV3_BACKEND", "reference")
    torch.manual_seed(0)
    with OpLog() as log:
        ref = run_every_op()
    assert log.dsv3_ops() == []
    for i, (a, b) in enumerate(zip(kernel, ref)):
        assert_close(a, b, f"result {i}")


def test_reference_backend_runs_the_layer(monkeypatch):
    moe = dsv3.MoE(dsv3.MoEConfig(dim=16, ffn_dim=24, n_experts=6, top_k=2, n_shared_experts=1))
    x = torch.randn(3, 5, 16)
    y_kernel = moe(x)
    monkeypatch.setenv("DSV3_BACKEND", "reference")
    with OpLog() as log:
        y_ref = moe(x)
        y_ref.sum().backward()
    assert log.dsv3_ops() == []
    assert_close(y_kernel, y_ref)


def test_reference_backend_ops_equal_reference_functions(monkeypatch):
    monkeypatch.setenv("DSV3_BACKEND", "reference")
    experts_TK = make_experts(10, 4, 2, "dropped")
    x_TD = torch.randn(10, 6)
    for got, want in zip(ops.permute(x_TD, experts_TK, 4), reference.permute(x_TD, experts_TK, 4)):
        assert torch.equal(got, want)


def test_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("DSV3_BACKEND", "triton-please")
    with pytest.raises(ValueError, match="DSV3_BACKEND"):
        ops.swiglu(torch.randn(2, 4))


def test_cuda_without_triton_warns_once_that_it_takes_the_reference(monkeypatch):
    """CUDA tensors without triton run plain PyTorch: right, but slow, and said once
    (a fake CUDA tensor stands in for a GPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dsv3.ops import backend
    with FakeTensorMode():
        x_cuda = torch.empty(2, device="cuda")
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    assert not backend.use_reference(x_cuda)
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    backend._warn_reference_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="triton is not installed.*pip install triton"):
        assert backend.use_reference(x_cuda)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.use_reference(x_cuda)  # no second warning
        assert not backend.use_reference(torch.empty(2))  # the CPU kernels need no triton

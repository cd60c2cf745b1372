"""Triton kernels and their launchers (GPU, and CPU under TRITON_INTERPRET=1).

Raw kernels only: no autograd and no modules; dsv3.ops dispatches to them. This
package must import without triton installed, so kernel modules import triton
themselves and are only imported by the ops when a GPU backend is in use.
"""

"""Makes Triton's interpreter patch triton.language once per launch, not once per call.

Under TRITON_INTERPRET=1 a kernel launch swaps triton.language's builtins for
interpreted ones, runs every program, and swaps them back. Triton does that swap
again (about a millisecond) on every call of a ``@triton.jit`` helper from inside
the kernel, although the launch's swap is still in place. Our kernels are split
into small helpers, so in the interpreter pass of ``make test`` those swaps took
about a third of the time (cProfile of tests/test_moe.py's medium case).

``install()`` wraps the interpreter's patch function: inside a launch, a helper
whose triton.language modules the launch has already patched is not patched
again; anything else (the launch itself, a helper that sees another module) goes
through Triton's own code. The patched state a kernel sees is therefore the same.
It also remembers the interpreter's Triton-to-NumPy dtype lookup, which builds a
dict of every dtype on each of its (hundreds of thousands of) calls: about a tenth
of what was left.

Where the interpreter's private names differ (another Triton release),
``install()`` changes nothing and the tests just run slower.
"""
import functools
import inspect

import triton.language as tl

_LANG_MODULES = (tl, tl.core)


@functools.cache
def _lang_modules(fn) -> frozenset[int]:
    return frozenset(id(value) for value in fn.__globals__.values()
                     if inspect.ismodule(value) and value in _LANG_MODULES)


class _LaunchScope:
    """The launch's own patch scope, which also marks the launch as over."""

    def __init__(self, scope, patched: list, langs: frozenset[int]):
        self._scope, self._patched = scope, patched
        patched.append(langs)

    def restore(self) -> None:
        self._patched.pop()
        self._scope.restore()


def install() -> bool:
    """Wraps triton.runtime.interpreter._patch_lang; True if it could."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch_lang = getattr(interpreter, "_patch_lang", None)
    if patch_lang is None or getattr(patch_lang, "_dsv3_once_per_launch", False):
        return False
    # Modules patched in the launch in progress (at most one: launches do not nest).
    patched: list[frozenset[int]] = []

    def patch_lang_once_per_launch(fn):
        langs = _lang_modules(fn)
        if patched and langs <= patched[-1]:
            return None  # a helper's call: its caller throws the scope away
        if patched:
            # A helper that sees another module (triton.language.standard's tl.sum and
            # tl.zeros see triton.language.core): Triton's way, once in the launch.
            patched[-1] |= langs
            return patch_lang(fn)
        return _LaunchScope(patch_lang(fn), patched, langs)

    patch_lang_once_per_launch._dsv3_once_per_launch = True
    interpreter._patch_lang = patch_lang_once_per_launch
    get_np_dtype = getattr(interpreter, "_get_np_dtype", None)
    if get_np_dtype is not None:
        interpreter._get_np_dtype = _remembering(get_np_dtype)
    return True


def _remembering(get_np_dtype):
    """get_np_dtype, remembered per scalar type: a block's NumPy dtype is its element's,
    and pointer and block types do not hash (pointers are answered first anyway)."""
    scalar_np_dtype = functools.cache(get_np_dtype)

    def lookup(tt_dtype):
        if isinstance(tt_dtype, tl.block_type):
            tt_dtype = tt_dtype.element_ty
        if isinstance(tt_dtype, tl.pointer_type):
            return get_np_dtype(tt_dtype)
        return scalar_np_dtype(tt_dtype)

    return lookup

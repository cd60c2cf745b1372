"""Bitonic top-k over int64 keys held in registers, for the router's selection.

The router keeps one token a thread, so its top-k is a per-thread problem over a
row of scores. Done in rounds (take the best, mask it, again), each round visits every
candidate several times (max, compare, select the id, min, mask): of the 8,800 sm_90
instructions a token of DeepSeek-V3's top-8 over four groups of 32, about 7,000 were
compares, selects, maxima and minima, most of them the rounds'. A bitonic
network visits each candidate a few times in all, one compare-exchange a pair a layer.

A key packs a score and its expert id so that one integer comparison orders both: the
score's fp32 bits mapped to an order-preserving int32 in the high half (negative
floats' magnitude bits flipped), ``N_EXPERTS - 1 - id`` in the low half, so that of
equal scores the lower id wins, as in the reference's stable sort. Every key is unique,
so the network's result does not depend on how it pairs candidates.

The networks work on the last axis of a [T, N] tile whose axis N lies in each thread's
registers (the router's layout: tokens across the lanes): the reshapes, permutes,
splits and joins below move no data (the router's sm_90 SASS has as many shuffles and
shared-memory accesses either way). N and K are powers of two.
"""
import triton
import triton.language as tl

from dsv3.kernels.config import INTERPRET

# Below every score's key: padding and invalid experts.
_NO_KEY = tl.constexpr(-9223372036854775807 - 1)

# On a GPU a compare-exchange is one 64-bit comparison and four selects, in PTX. Written
# as two tl.where on one comparison, LLVM turns the pair into smax and smin, which ptxas
# expands with a comparison each: 8 instructions instead of 6, and DeepSeek-V3's router
# compiled to 7,784 instructions and 168 registers with a spill, against 6,648 and 113
# (sm_90, Triton 3.6).
_PTX: tl.constexpr = tl.constexpr(not INTERPRET)


@triton.constexpr_function
def _log2(n):
    return n.bit_length() - 1


@triton.jit
def keys_of(scores, ids, valid, N_EXPERTS: tl.constexpr):
    """Keys of fp32 ``scores`` and int32 ``ids`` (same shape); _NO_KEY where not valid.
    Scores are never -0.0 here (they are p + bias with p >= +0, and only -0.0 + -0.0
    rounds to -0.0), which these keys would order below +0.0."""
    bits = scores.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    keys = (ordered.to(tl.int64) << 32) | (N_EXPERTS - 1 - ids).to(tl.int64)
    return tl.where(valid, keys, _NO_KEY)


@triton.jit
def ids_of(keys, N_EXPERTS: tl.constexpr):
    """The expert ids of keys (N_EXPERTS - 1 for _NO_KEY: inside the rows)."""
    return N_EXPERTS - 1 - (keys & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def scores_of(keys):
    """The fp32 scores of keys."""
    ordered = (keys >> 32).to(tl.int32)
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def no_keys(T: tl.constexpr, K: tl.constexpr):
    """An empty top-k list [T, K]."""
    return tl.full((T, K), _NO_KEY, tl.int64)


@triton.jit
def _larger_smaller(a, b):
    """(max, min) of two key tensors from one comparison."""
    if _PTX:
        return tl.inline_asm_elementwise(
            "{ .reg .pred a_wins; setp.gt.s64 a_wins, $2, $3; "
            "selp.b64 $0, $2, $3, a_wins; selp.b64 $1, $3, $2, a_wins; }",
            "=l,=l,l,l", [a, b], dtype=(tl.int64, tl.int64), is_pure=True, pack=1)
    a_wins = a > b
    return tl.where(a_wins, a, b), tl.where(a_wins, b, a)


@triton.jit
def _exchange(keys, STRIDE: tl.constexpr, RUN: tl.constexpr, ALL_DESCENDING: tl.constexpr):
    """One compare-exchange layer on the last axis of keys [T, N]: position p with p +
    STRIDE (p's STRIDE bit clear), putting runs of RUN in descending order (the even
    runs, or all with ALL_DESCENDING) or ascending (the odd ones)."""
    T: tl.constexpr = keys.shape[0]
    N: tl.constexpr = keys.shape[1]
    pairs = tl.permute(tl.reshape(keys, (T, N // (2 * STRIDE), 2, STRIDE)), (0, 1, 3, 2))
    first, second = tl.split(pairs)
    larger, smaller = _larger_smaller(first, second)
    if ALL_DESCENDING:
        first = larger
        second = smaller
    else:
        run = tl.arange(0, N // (2 * STRIDE))[None, :, None] // (RUN // (2 * STRIDE))
        descending = (run % 2) == 0
        first = tl.where(descending, larger, smaller)
        second = tl.where(descending, smaller, larger)
    return tl.reshape(tl.permute(tl.join(first, second), (0, 1, 3, 2)), (T, N))


@triton.jit
def _sort_bitonic_runs(keys, RUN: tl.constexpr, ALL_DESCENDING: tl.constexpr):
    """Each run of RUN keys, bitonic on entry, sorted (directions as in _exchange)."""
    for level in tl.static_range(_log2(RUN)):
        keys = _exchange(keys, RUN >> (level + 1), RUN, ALL_DESCENDING)
    return keys


@triton.jit
def _keep_larger_half(keys, K: tl.constexpr):
    """Runs 2j (descending) and 2j+1 (ascending) of K keys to the K largest of the two,
    elementwise: a bitonic run."""
    T: tl.constexpr = keys.shape[0]
    N: tl.constexpr = keys.shape[1]
    even, odd = tl.split(tl.permute(tl.reshape(keys, (T, N // (2 * K), 2, K)), (0, 1, 3, 2)))
    return tl.reshape(tl.maximum(even, odd), (T, N // 2))


@triton.jit
def top_keys(keys, K: tl.constexpr):
    """The K largest keys of each row of keys [T, N], sorted descending ([T, K]): runs
    of K sorted in alternating directions, then halved until K are left, each half
    sorted again."""
    N: tl.constexpr = keys.shape[1]
    for level in tl.static_range(1, _log2(K) + 1):
        keys = _sort_bitonic_runs(keys, 1 << level, (1 << level) == N)
    for level in tl.static_range(_log2(N // K)):
        keys = _sort_bitonic_runs(_keep_larger_half(keys, K), K, N >> (level + 1) == K)
    return keys


@triton.jit
def merge_top_keys(top_a, top_b):
    """The top K of two descending lists [T, K]: against b reversed, a's larger entries
    form a bitonic run of the K largest, then sorted."""
    K: tl.constexpr = top_a.shape[1]
    return _sort_bitonic_runs(tl.maximum(top_a, tl.flip(top_b, 1)), K, True)

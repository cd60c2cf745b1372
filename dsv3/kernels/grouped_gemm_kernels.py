"""The grouped GEMM's Triton device code (grouped_gemm launches it): forward/dgrad (``y_SY = x_SX @ w_EXY[e]`` per expert
segment) and wgrad (``dw_EXY[e] = x_e^T @ dy_e``), bf16/fp16/fp32 in, fp32
accumulation. Both can read their input rows through a token index instead
(ScatterMoE-style: the permute fused into the loads, so the expert-ordered copy
of the tokens is never written, nor kept for the backward). The routing weight is
not folded into the second GEMM's epilogue: unpermute already applies it in its one
read of y_SD, and fusing the scatter-add too would need atomics, whose summation
order (and so the result) changes from run to run.

The forward is persistent, without host syncs: a fixed number of programs (one per
SM on a GPU) walks the (row tile, column tile) space with a stride, each expert's
tiles in grouped order (GROUP_M row tiles at a time) for L2 reuse. Each program
first reads the offsets once and builds the tile table on the device: tiles per
segment and their cumulative sum (the rows after the last expert, dropped copies,
form one more segment whose tiles store zeros, so no separate memset is needed).
The walk stops at the real number of tiles, so tiny and huge experts share one
launch, the launch size does not depend on the routing, and no program idles
on a tile past the end. The tail's tiles are zeros and have a loop of their own, so
that every tile of the main walk runs the same steps: Triton can then flatten the
tile and step loops into one pipeline (the FLATTEN variant), whose next tile's loads
are in flight while a tile stores.

Where the inputs allow (16-bit, TMA-aligned; see tma_descriptors), both GEMMs may
load their tiles through Hopper's TMA instead of pointers: a constexpr apart, one
more variant for the autotuner to weigh, untimed as yet. Gathered rows of x are
scattered, so they keep to pointer loads while the other operand takes TMA.

The wgrad has two launches, a constexpr apart, and the autotuner picks: a grid of
one program per (tile, expert), and a persistent walk over all (expert, tile)
pairs like the forward's. Every expert has the same tiles there (its rows are the
reduction), so neither needs a tile table. The persistent TMA walk may also run as
one flattened loop (FLATTEN), whose tiles build their own TMA descriptors over
their expert's rows (_wgrad_uniform_walk).

offsets_E and token_S come from the caller: the kernels keep every access inside the
tensors whatever they hold, and report bad values through flags (device_checks) where
the C++ kernel raises.
"""
import triton
import triton.language as tl

from dsv3.kernels.config import INTERPRET


@triton.jit
def _segments(offsets_ptr, n_experts, n_rows, BLOCK_E: tl.constexpr):
    """Per segment (experts, then the dropped-copies tail): first and end row, and
    whether offsets_E is valid (non-decreasing, within [0, n_rows]). Bad offsets are
    the caller's error, raised after the launch (device_checks): until then the rows
    are clamped into [0, n_rows] and every size to >= 0, so no access leaves x or y."""
    seg = tl.arange(0, BLOCK_E)
    ends = tl.load(offsets_ptr + seg, mask=seg < n_experts, other=0)
    ends = tl.where(seg == n_experts, n_rows, ends)
    starts = tl.load(offsets_ptr + seg - 1, mask=(seg > 0) & (seg < n_experts + 1), other=0)
    bad = (seg <= n_experts) & ((ends < starts) | (ends > n_rows))
    valid = tl.sum(bad.to(tl.int32), 0) == 0
    starts = tl.minimum(tl.maximum(starts, 0), n_rows)
    ends = tl.maximum(tl.minimum(ends, n_rows), starts)
    return starts, ends, valid


@triton.jit
def _report_offsets(offsets_ptr, ok_ptr, n_experts, n_rows, BLOCK_E: tl.constexpr):
    """The first program writes whether offsets_E is valid to ok[0] (the launcher raises
    on it). No other program writes there, so it needs no initial value."""
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        _, _, valid = _segments(offsets_ptr, n_experts, n_rows, BLOCK_E)
        tl.store(ok_ptr, valid.to(tl.int32))


@triton.jit
def _segment_table(offsets_ptr, n_experts, n_rows, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per segment: first row, end row, row tiles and their inclusive cumulative sum."""
    starts, ends, _ = _segments(offsets_ptr, n_experts, n_rows, BLOCK_E)
    sizes = tl.where(tl.arange(0, BLOCK_E) <= n_experts, ends - starts, 0)
    tiles = (sizes + BLOCK_M - 1) // BLOCK_M
    return starts, ends, tiles, tl.cumsum(tiles, 0)


@triton.jit
def _find_segment(starts, ends, tiles, tiles_end, row_tile, BLOCK_E: tl.constexpr):
    """(segment, first row, end row, first row tile, row tiles) of the segment holding
    row tile ``row_tile``: an expert's (the forward's walk stops before the tail's
    tiles, segment ``n_experts``)."""
    seg = tl.arange(0, BLOCK_E)
    segment = tl.sum((tiles_end <= row_tile).to(tl.int32), 0)
    here = seg == segment
    first_row = tl.sum(tl.where(here, starts, 0), 0)
    end_row = tl.sum(tl.where(here, ends, 0), 0)
    segment_tiles = tl.sum(tl.where(here, tiles, 0), 0)
    first_tile = tl.sum(tl.where(here, tiles_end, 0), 0) - segment_tiles
    return segment, first_row, end_row, first_tile, segment_tiles


@triton.jit
def _grouped_order(tile, n_row_tiles, n_col_tiles, GROUP_M: tl.constexpr):
    """(row tile, column tile) of the ``tile``-th tile of an n_row_tiles x n_col_tiles
    grid, taken GROUP_M row tiles at a time, columns outer: programs in flight share
    a few row tiles and a few column tiles, so both stay in L2. In plain row-major
    order an expert's whole weight matrix streams from HBM once per row tile (seen
    on an H200: the Mixtral-shape forward was bound by those re-reads)."""
    per_group = GROUP_M * n_col_tiles
    first = (tile // per_group) * GROUP_M
    rows_in_group = tl.minimum(n_row_tiles - first, GROUP_M)
    in_group = tile % per_group
    return first + in_group % rows_in_group, in_group // rows_in_group


@triton.jit
def _report_bad_tokens(ok_ptr, bad):
    """Clears the flag ok[1] (the launcher raises on it) if any of ``bad`` is set."""
    tl.store(ok_ptr + 1 + tl.zeros_like(bad.to(tl.int32)), 0, mask=bad)


@triton.jit
def _rows_of_x(tokens, live, n_tokens):
    """(rows of x that live rows copying ``tokens`` read, which of them to read, which
    name no row of x: not read, and reported)."""
    in_x = (tokens >= 0) & (tokens < n_tokens)
    return tokens.to(tl.int64), live & in_x, live & ~in_x


@triton.jit
def _input_rows(token_ptr, ok_ptr, rows, end_row, n_tokens, GATHER: tl.constexpr):
    """The forward's (rows of x a tile reads, which of them to read): its own rows below
    end_row, or (permute fused in) the tokens they copy. token_S comes from the caller:
    a token that is not a row of x is not read, and is reported (_report_bad_tokens)."""
    live = rows < end_row
    if GATHER:
        x_rows, read, bad = _rows_of_x(tl.load(token_ptr + rows, mask=live, other=0), live,
                                       n_tokens)
        _report_bad_tokens(ok_ptr, bad)
        return x_rows, read
    return rows.to(tl.int64), live


@triton.jit
def _grouped_mm_kernel(x_ptr, w_ptr, y_ptr, offsets_ptr, token_ptr, ok_ptr, x_desc, w_desc,
                       n_rows, n_tokens,
                       n_experts, DIM_X, DIM_Y, rows_per_expert_log2, stride_xs, stride_xx,
                       stride_we, stride_wx, stride_wy, stride_ys, stride_yy, PRECISION: tl.constexpr,
                       GATHER: tl.constexpr, W_KMAJOR: tl.constexpr, USE_TMA: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
                       FLATTEN: tl.constexpr = False):
    _report_offsets(offsets_ptr, ok_ptr, n_experts, n_rows, BLOCK_E)
    starts, ends, tiles, tiles_end = _segment_table(offsets_ptr, n_experts, n_rows, BLOCK_M,
                                                    BLOCK_E)
    n_col_tiles = tl.cdiv(DIM_Y, BLOCK_N)
    n_tiles = tl.sum(tiles, 0) * n_col_tiles
    # The experts' tiles come first, the dropped-copies tail's last.
    is_tail = tl.arange(0, BLOCK_E) == n_experts
    tail_first_tile = tl.sum(tl.where(is_tail, tiles_end - tiles, 0), 0)
    tail_first_row = tl.sum(tl.where(is_tail, starts, 0), 0)
    expert_tiles = tail_first_tile * n_col_tiles
    inner = tl.arange(0, BLOCK_K)
    # A segment's tiles are flat tiles [first_tile, first_tile + its tiles) * n_col_tiles;
    # within it they are taken in grouped order. Every tile runs the same DIM_X / BLOCK_K
    # steps, so Triton can flatten the two loops into one (FLATTEN, a variant for the
    # autotuner): the next tile's first loads then go out before this tile's store.
    for flat_tile in tl.range(tl.program_id(0), expert_tiles, tl.num_programs(0),
                              flatten=FLATTEN):
        segment, first_row, end_row, first_tile, segment_tiles = _find_segment(
            starts, ends, tiles, tiles_end, flat_tile // n_col_tiles, BLOCK_E)
        tile, col_tile = _grouped_order(flat_tile - first_tile * n_col_tiles, segment_tiles,
                                        n_col_tiles, GROUP_M)
        rows = first_row + tile * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        w_base = w_ptr + segment.to(tl.int64) * stride_we
        x_rows, x_live = _input_rows(token_ptr, ok_ptr, rows, end_row, n_tokens, GATHER)
        for k0 in range(0, DIM_X, BLOCK_K):
            ks = k0 + inner
            if USE_TMA and x_desc is not None:
                # TMA copies whole boxes, zero past the tensors' ends: the rows past
                # this expert's are the next segment's, loaded and then masked at
                # the store like the rest of the tile.
                x_tile = x_desc.load([first_row + tile * BLOCK_M, k0])
            else:  # pointers: gathered rows are scattered, no TMA box holds them
                x_tile = tl.load(x_ptr + x_rows[:, None] * stride_xs + ks[None, :] * stride_xx,
                                 mask=x_live[:, None] & (ks[None, :] < DIM_X), other=0.0)
            if USE_TMA and w_desc is not None:
                if W_KMAJOR:
                    w_tile = w_desc.load([segment, col_tile * BLOCK_N, k0])
                    w_tile = w_tile.reshape(BLOCK_N, BLOCK_K).trans()
                else:
                    w_tile = w_desc.load([segment, k0, col_tile * BLOCK_N])
                    w_tile = w_tile.reshape(BLOCK_K, BLOCK_N)
            else:
                w_tile = tl.load(w_base + ks[:, None] * stride_wx + cols[None, :] * stride_wy,
                                 mask=(ks[:, None] < DIM_X) & (cols[None, :] < DIM_Y),
                                 other=0.0)
            acc = tl.dot(x_tile, w_tile, acc, input_precision=PRECISION)
        _store_tile(y_ptr, acc, rows, end_row, cols, DIM_Y, stride_ys, stride_yy)
    # The tail's rows (copies no expert took) are zeros: stored without a loop of
    # GEMM steps, which would also keep the experts' loop from flattening.
    for flat_tile in range(expert_tiles + tl.program_id(0), n_tiles, tl.num_programs(0)):
        rows = (tail_first_row + (flat_tile // n_col_tiles - tail_first_tile) * BLOCK_M
                + tl.arange(0, BLOCK_M))
        cols = (flat_tile % n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        _store_tile(y_ptr, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), rows, n_rows, cols,
                    DIM_Y, stride_ys, stride_yy)


@triton.jit
def _store_tile(y_ptr, acc, rows, end_row, cols, DIM_Y, stride_ys, stride_yy):
    """The forward's [BLOCK_M, BLOCK_N] output tile, rows below end_row."""
    out_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ys + cols[None, :] * stride_yy
    tl.store(out_ptrs, acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < end_row) & (cols[None, :] < DIM_Y))


# On a GPU the wgrad's reduction loop reads token_S through inline PTX. A tl.load of it
# there becomes an asynchronous copy in the same group as the x and dy tiles whose
# addresses it gives, so every step waited for all copies in flight (async_wait num = 0
# in the sm_90 TTGIR, Triton 3.6 and 3.8): the gathered wgrad ran its loads one step
# ahead where the plain one runs num_stages - 1. Run 4 timed Mixtral's gathered gate/up
# wgrad at 5.04 ms against 3.52 ms on expert-ordered rows. Read into registers, the
# tokens leave the loop pipelined as the plain one is (the same async_wait counts,
# tests/test_sm90_compile.py). The interpreter has no PTX.
_PTX_TOKEN_LOADS: tl.constexpr = tl.constexpr(not INTERPRET)


@triton.jit
def _tokens_at(token_ptr, rows, live):
    """token_S[rows] where ``live`` (rows below the expert's end, so inside token_S), 0
    elsewhere: the other lanes read nothing. The guard is inside the PTX because the
    pipeliner issues the first steps' reads before it knows the loop runs at all: for an
    expert with no rows (end == start, even 0) an unguarded read would land outside
    token_S."""
    if _PTX_TOKEN_LOADS:
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; mov.b32 $0, 0; @p ld.global.nc.b32 $0, [$1]; }",
            "=r,l,r", [token_ptr + rows, live.to(tl.int32)], dtype=tl.int32, is_pure=True,
            pack=1)
    return tl.load(token_ptr + rows, mask=live, other=0)


@triton.jit
def _x_tile_T(x_ptr, token_ptr, rows, end, n_tokens, xs, DIM_X, stride_xs, stride_xx, bad_rows,
              GATHER: tl.constexpr):
    """The wgrad's [BLOCK_M, BLOCK_K] tile of x^T for reduction rows ``rows`` (below end),
    through pointers, and ``bad_rows`` with those whose token names no row of x added.
    Nothing is stored in the loop: the bad rows are reported once after it."""
    live = rows < end
    if GATHER:
        x_rows, x_live, bad = _rows_of_x(_tokens_at(token_ptr, rows, live), live, n_tokens)
        bad_rows = bad_rows | bad
    else:
        x_rows, x_live = rows.to(tl.int64), live
    x_tile_T = tl.load(x_ptr + x_rows[None, :] * stride_xs + xs[:, None] * stride_xx,
                       mask=x_live[None, :] & (xs[:, None] < DIM_X), other=0.0)
    return x_tile_T, bad_rows


@triton.jit
def _held(tile):
    """``tile`` itself, through an opaque move where it is used. Triton stores a dot's
    loaded operands to shared memory right after their loads, which waits for them
    there: loaded before the wgrad's loop for use after it, the partial last step's
    tiles would hold back the loop's first TMA copies until they arrived. Moved after
    the loop (not pure: it stays where it is written), they are waited for there."""
    if _PTX_TOKEN_LOADS:
        tl.static_assert(tile.dtype.primitive_bitwidth == 16, "TMA wgrads are 16-bit")
        return tl.inline_asm_elementwise("mov.b16 $0, $1;", "=h,h", [tile], dtype=tile.dtype,
                                         is_pure=False, pack=1)
    return tile


@triton.jit
def _wgrad_step_tiles(x_ptr, dy_ptr, token_ptr, bad_rows, r0, end, n_tokens, xs, ys, DIM_X,
                      DIM_Y, stride_xs, stride_xx, stride_ds, stride_dy, GATHER: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """(the x^T and dy tiles of one BLOCK_K step of the reduction over rows [r0,
    min(r0 + BLOCK_K, end)), through pointers, zero past the expert's end; bad_rows as
    _x_tile_T leaves it)."""
    rows = r0 + tl.arange(0, BLOCK_K)
    x_tile_T, bad_rows = _x_tile_T(x_ptr, token_ptr, rows, end, n_tokens, xs, DIM_X, stride_xs,
                                   stride_xx, bad_rows, GATHER)
    dy_tile = tl.load(dy_ptr + rows[:, None].to(tl.int64) * stride_ds + ys[None, :] * stride_dy,
                      mask=(rows[:, None] < end) & (ys[None, :] < DIM_Y), other=0.0)
    return x_tile_T, dy_tile, bad_rows


@triton.jit
def _wgrad_step(x_ptr, dy_ptr, token_ptr, acc, bad_rows, r0, end, n_tokens, xs, ys, DIM_X,
                DIM_Y, stride_xs, stride_xx, stride_ds, stride_dy, PRECISION: tl.constexpr,
                GATHER: tl.constexpr, BLOCK_K: tl.constexpr):
    """(acc plus one BLOCK_K step of _wgrad_step_tiles, bad_rows)."""
    x_tile_T, dy_tile, bad_rows = _wgrad_step_tiles(x_ptr, dy_ptr, token_ptr, bad_rows, r0, end,
                                                    n_tokens, xs, ys, DIM_X, DIM_Y, stride_xs,
                                                    stride_xx, stride_ds, stride_dy, GATHER,
                                                    BLOCK_K)
    return tl.dot(x_tile_T, dy_tile, acc, input_precision=PRECISION), bad_rows


@triton.jit
def _expert_rows(offsets_ptr, expert, n_rows):
    """(first row, end row) of ``expert``, in [0, n_rows] whatever offsets_E holds."""
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(offsets_ptr + expert)
    start = tl.minimum(tl.maximum(start, 0), n_rows)
    return start, tl.maximum(tl.minimum(end, n_rows), start)


@triton.jit
def _wgrad_tile(x_ptr, dy_ptr, dw_ptr, offsets_ptr, token_ptr, ok_ptr, x_desc, dy_desc, expert,
                tile, n_rows, n_tokens, DIM_X, DIM_Y, stride_xs, stride_xx, stride_ds, stride_dy,
                stride_we, stride_wx, stride_wy, PRECISION: tl.constexpr, GATHER: tl.constexpr,
                USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The ``tile``-th output tile of dw[expert] = x_e^T @ dy_e, reduced over the expert's
    rows (tiles in grouped order). An empty expert's loop runs zero times and stores the
    zeros it started from: every dw[e] is written, no memset needed."""
    start, end = _expert_rows(offsets_ptr, expert, n_rows)
    x_tile, y_tile = _grouped_order(tile, tl.cdiv(DIM_X, BLOCK_M), tl.cdiv(DIM_Y, BLOCK_N),
                                    GROUP_M)
    xs = x_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    ys = y_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bad_rows = tl.arange(0, BLOCK_K) < 0  # reduction rows seen naming no row of x
    if USE_TMA and dy_desc is not None:
        # The whole BLOCK_K steps through TMA, unmasked (all their rows are this
        # expert's); the partial last one, if any, through masked pointers: a TMA box
        # past `end` would add the next expert's rows into the sum. Its tiles are loaded
        # before the loop and added after it, so their latency hides behind the loop
        # (loaded after it, every tile waited one more round trip to memory, which in
        # fine-grained experts' reductions of a few steps is a good part of the tile).
        # Where x has no descriptor (gathered rows are scattered; or TMA cannot read x)
        # it keeps to pointer loads while dy takes TMA.
        tail = start + (end - start) // BLOCK_K * BLOCK_K
        x_tail_T, dy_tail, bad_rows = _wgrad_step_tiles(
            x_ptr, dy_ptr, token_ptr, bad_rows, tail, end, n_tokens, xs, ys, DIM_X, DIM_Y,
            stride_xs, stride_xx, stride_ds, stride_dy, GATHER, BLOCK_K)
        for r0 in range(start, tail, BLOCK_K):
            if x_desc is not None:
                x_tile_T = x_desc.load([r0, x_tile * BLOCK_M]).trans()
            else:
                x_tile_T, bad_rows = _x_tile_T(x_ptr, token_ptr, r0 + tl.arange(0, BLOCK_K), end,
                                               n_tokens, xs, DIM_X, stride_xs, stride_xx,
                                               bad_rows, GATHER)
            dy_tile = dy_desc.load([r0, y_tile * BLOCK_N])
            acc = tl.dot(x_tile_T, dy_tile, acc, input_precision=PRECISION)
        if tail < end:
            acc = tl.dot(_held(x_tail_T), _held(dy_tail), acc, input_precision=PRECISION)
    else:
        for r0 in range(start, end, BLOCK_K):
            acc, bad_rows = _wgrad_step(x_ptr, dy_ptr, token_ptr, acc, bad_rows, r0, end,
                                        n_tokens, xs, ys, DIM_X, DIM_Y, stride_xs, stride_xx,
                                        stride_ds, stride_dy, PRECISION, GATHER, BLOCK_K)
    if GATHER:
        _report_bad_tokens(ok_ptr, bad_rows)
    _store_dw_tile(dw_ptr, acc, expert, xs, ys, DIM_X, DIM_Y, stride_we, stride_wx, stride_wy)


@triton.jit
def _wgrad_uniform_walk(x_ptr, dy_ptr, dw_ptr, offsets_ptr, n_rows, n_experts, DIM_X, DIM_Y,
                        stride_xs, stride_ds, stride_we, stride_wx, stride_wy,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr):
    """The persistent wgrad's walk as one flattened loop (FLATTEN), returning how many of
    the (expert, tile) pairs it took: all of them, or none under skewed routing.

    Flattened, the next tile's loads are in flight while a tile stores; for experts of a
    few BLOCK_K steps (DeepSeek-V3 at 4096 tokens: 2) that store is a good part of the
    tile. Triton (3.6) flattens only loops whose inner step count is the same for every
    tile, and once flattened it pipelines TMA loads but not x^T's pointer loads. TMA
    descriptors over the whole of x and dy would read the next expert's rows into the
    sum, so each tile builds its own over its expert's rows, which TMA reads as zeros
    past the end: every tile can then run the longest expert's steps. (Triton keeps one
    descriptor per pipeline stage, so copies in flight never read a rewritten one; the
    launcher gives it their memory, scratch.triton_scratch.) The caller takes it only
    where x and dy have host descriptors, i.e. are TMA-readable (16-bit, 16-byte aligned
    rows, unit last stride) and x's rows are not gathered: the strides given here are
    then valid for TMA."""
    uniform, max_steps = _uniform_steps(offsets_ptr, n_experts, n_rows, BLOCK_K, BLOCK_E)
    n_col_tiles = tl.cdiv(DIM_Y, BLOCK_N)
    tiles = tl.cdiv(DIM_X, BLOCK_M) * n_col_tiles
    walked = tl.where(uniform, n_experts * tiles, 0)
    for flat_tile in tl.range(tl.program_id(0), walked, tl.num_programs(0), flatten=True):
        # Clamped as well: the pipeliner works out the descriptors of tiles stages ahead,
        # whose reads of offsets_E it may issue before knowing the walk has them.
        expert = tl.minimum(flat_tile // tiles, n_experts - 1)
        start, end = _expert_rows(offsets_ptr, expert, n_rows)
        # An empty expert still gets a descriptor of one row (none of zero rows is
        # valid), inside x and dy (x_desc there: n_rows > 0); its sum is replaced by
        # zeros below.
        first = tl.maximum(tl.minimum(start, n_rows - 1), 0)
        rows = tl.maximum(end - first, 1)
        x_desc = tl.make_tensor_descriptor(x_ptr + first.to(tl.int64) * stride_xs,
                                           shape=[rows, DIM_X], strides=[stride_xs, 1],
                                           block_shape=[BLOCK_K, BLOCK_M])
        dy_desc = tl.make_tensor_descriptor(dy_ptr + first.to(tl.int64) * stride_ds,
                                            shape=[rows, DIM_Y], strides=[stride_ds, 1],
                                            block_shape=[BLOCK_K, BLOCK_N])
        x_tile, y_tile = _grouped_order(flat_tile % tiles, tl.cdiv(DIM_X, BLOCK_M), n_col_tiles,
                                        GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, max_steps * BLOCK_K, BLOCK_K):
            x_tile_T = x_desc.load([r0, x_tile * BLOCK_M]).trans()
            dy_tile = dy_desc.load([r0, y_tile * BLOCK_N])
            acc = tl.dot(x_tile_T, dy_tile, acc, input_precision=PRECISION)
        acc = tl.where(end > start, acc, 0.0)
        xs = x_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        ys = y_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        _store_dw_tile(dw_ptr, acc, expert, xs, ys, DIM_X, DIM_Y, stride_we, stride_wx,
                       stride_wy)
    return walked


@triton.jit
def _uniform_steps(offsets_ptr, n_experts, n_rows, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """(whether the wgrad takes its uniform walk, the longest expert's BLOCK_K steps).
    Every tile of that walk runs the longest expert's steps, the others' past their rows
    adding TMA's zeros: taken while that is at most a quarter more steps than the
    experts' own (balanced routing: none, or a third step for some experts of two), and
    left to the nested loop under more skewed routing."""
    starts, ends, _ = _segments(offsets_ptr, n_experts, n_rows, BLOCK_E)
    steps = tl.where(tl.arange(0, BLOCK_E) < n_experts, (ends - starts + BLOCK_K - 1) // BLOCK_K,
                     0)
    max_steps = tl.max(steps, 0)
    return max_steps * n_experts * 4 <= tl.sum(steps, 0) * 5, max_steps


@triton.jit
def _store_dw_tile(dw_ptr, acc, expert, xs, ys, DIM_X, DIM_Y, stride_we, stride_wx, stride_wy):
    """The wgrad's output tile dw[expert][xs, ys], inside dw."""
    out_ptrs = (dw_ptr + expert.to(tl.int64) * stride_we + xs[:, None] * stride_wx
                + ys[None, :] * stride_wy)
    tl.store(out_ptrs, acc.to(dw_ptr.dtype.element_ty),
             mask=(xs[:, None] < DIM_X) & (ys[None, :] < DIM_Y))


@triton.jit
def _grouped_mm_wgrad_kernel(x_ptr, dy_ptr, dw_ptr, offsets_ptr, token_ptr, ok_ptr, x_desc,
                             dy_desc, n_rows, n_tokens, n_experts, DIM_X, DIM_Y,
                             rows_per_expert_log2,
                             stride_xs, stride_xx, stride_ds, stride_dy, stride_we, stride_wx,
                             stride_wy, PRECISION: tl.constexpr, GATHER: tl.constexpr,
                             USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
                             PERSISTENT: tl.constexpr, FLATTEN: tl.constexpr = False):
    _report_offsets(offsets_ptr, ok_ptr, n_experts, n_rows, BLOCK_E)
    if PERSISTENT:
        # A fixed number of programs walks every (expert, tile) with a stride, expert
        # outermost: one launch and pipeline fill per program rather than per tile, which
        # may pay where an expert's reduction is only a few BLOCK_K steps (to be measured;
        # the autotuner weighs both variants). Every expert has the same tiles, so the
        # walk needs no table and its length no host sync. FLATTEN walks them in one
        # flattened loop where routing allows, and this loop takes what it left.
        tiles = tl.cdiv(DIM_X, BLOCK_M) * tl.cdiv(DIM_Y, BLOCK_N)
        walked = 0
        if FLATTEN and x_desc is not None and dy_desc is not None:
            # (Checked here too: the autotuner's pick for a key is reused on later calls,
            # whose x or dy TMA may not read, e.g. a strided or expanded gradient.)
            walked = _wgrad_uniform_walk(x_ptr, dy_ptr, dw_ptr, offsets_ptr, n_rows, n_experts,
                                         DIM_X, DIM_Y, stride_xs, stride_ds, stride_we,
                                         stride_wx, stride_wy, PRECISION, BLOCK_M, BLOCK_N,
                                         BLOCK_K, BLOCK_E, GROUP_M)
        for flat_tile in range(tl.program_id(0) + walked, n_experts * tiles,
                               tl.num_programs(0)):
            _wgrad_tile(x_ptr, dy_ptr, dw_ptr, offsets_ptr, token_ptr, ok_ptr, x_desc, dy_desc,
                        flat_tile // tiles, flat_tile % tiles, n_rows, n_tokens, DIM_X, DIM_Y,
                        stride_xs, stride_xx, stride_ds, stride_dy, stride_we, stride_wx,
                        stride_wy, PRECISION, GATHER, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        # Program (tile, e). Axis 0 (the fastest-launched) walks one expert's tiles, so
        # programs in flight read the same expert's rows of x and dy from L2.
        _wgrad_tile(x_ptr, dy_ptr, dw_ptr, offsets_ptr, token_ptr, ok_ptr, x_desc, dy_desc,
                    tl.program_id(1), tl.program_id(0), n_rows, n_tokens, DIM_X, DIM_Y, stride_xs,
                    stride_xx, stride_ds, stride_dy, stride_we, stride_wx, stride_wy, PRECISION,
                    GATHER, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)

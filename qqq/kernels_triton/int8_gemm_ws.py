"""The int8 x int8 -> int32 GEMM of ``int8_gemm`` as a warp-specialized Gluon kernel for Hopper (config ``WS``).

One producer warp copies the weight and activation tiles into a ring of shared-memory slots with the TMA unit; the
default partition (``num_warps`` warps, two warpgroups at 8) waits for a slot, issues the asynchronous wgmma on it
and hands the previous slot back to the producer once its wgmma has retired, then runs the epilogue of
``int8_gemm.scaled_store`` (scales, bias, X16, the int32 output, SiLU*up). ``acc[BLOCK_N, BLOCK_M] += W @ A^T`` as
in ``int8_gemm``. The tile loop runs in both partitions and the ring runs on across tiles, so a grid of one program
per SM (``WS=2``) is persistent: the producer fills the next tile's slots during a tile's epilogue; ``WS=1`` has a
program per tile.

Why Gluon: Triton 3.6 leaves ``tl.range(..., warp_specialize=True)`` without effect on sm_90 for both the fused W4A8
loop and the persistent TMA int8 GEMM (the attribute reaches the TTGIR; no ``ttg.warp_specialize`` region is made),
so warp specialization on Hopper is written by hand (NOTES.md). Gluon kernels do not run under the interpreter:
the CPU tests compile them for sm_90 (``tests/compile_for_gpu.py``) and the GPU suite checks them.
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from qqq.kernels_triton.gpu import current_gpu
from qqq.kernels_triton.swiglu import silu_times_up

# renamed after Triton 3.6 (the GPU machine's), same arguments: the TMA copy into shared memory, the barrier of
# the partition's warps
tma_load = getattr(tma, "async_load", None) or getattr(tma, "async_copy_global_to_shared")
partition_barrier = getattr(gl, "thread_barrier", None) or getattr(gl, "barrier")


@gluon.constexpr_function
def accumulator_layout(block_n, block_m, num_warps):
    """The wgmma accumulator layout of a [block_n, block_m] int32 tile: warps stacked along the weight rows, the
    widest instruction N that divides block_m (at most 128: Triton 3.6's sm_90 lowering rejects an int8 wgmma of N
    256), K 32 (int8)."""
    warps_n = min(num_warps, max(4, block_n // 16))
    warps_m = num_warps // warps_n
    n = 128
    while n > max(block_m // warps_m, 8) or block_m % n:
        n -= 8
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps_n, warps_m], instr_shape=[16, n, 32])


@gluon.jit
def _tile_offsets(tile, M, N, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, GROUP_N: gl.constexpr):
    """The first weight row and token of output tile ``tile`` in the grouped order of
    ``int8_gemm.tile_coordinates``."""
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    pids_per_group = GROUP_N * num_pid_m
    first_pid_n = (tile // pids_per_group) * GROUP_N
    group_n = min(num_pid_n - first_pid_n, GROUP_N)
    return ((first_pid_n + (tile % pids_per_group) % group_n) * BLOCK_N,
            ((tile % pids_per_group) // group_n) * BLOCK_M)


@gluon.jit
def tile_counts(M, N, K, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr):
    """The output tiles of an [M, N] product and the K steps of each."""
    return ((N + BLOCK_N - 1) // BLOCK_N) * ((M + BLOCK_M - 1) // BLOCK_M), (K + BLOCK_K - 1) // BLOCK_K


@gluon.jit
def work_unit(unit, k_tiles, SPLIT_K: gl.constexpr):
    """Work unit ``unit`` of a grid over ``tiles * SPLIT_K`` units: its output tile and its K steps
    ``[first, end)``, the tile's steps in ``SPLIT_K`` parts that differ by at most one step (none empty while
    ``SPLIT_K <= k_tiles``). The parts of a tile are consecutive units, so they run side by side."""
    part = unit % SPLIT_K
    return unit // SPLIT_K, part * k_tiles // SPLIT_K, (part + 1) * k_tiles // SPLIT_K


@gluon.jit
def split_k_sum(acc, tile, workspace_ptr, tickets_ptr, off_n, off_m, M, N, ACC_LAYOUT: gl.constexpr,
                SPLIT_K: gl.constexpr):
    """``int8_gemm.split_k_sum`` in Gluon: the unit's int32 sums go into the zeroed workspace [M, N]; returns
    ``(total, last)``, ``last`` for the tile's last unit to take its ticket, whose ``total`` is the whole sum and
    which leaves the workspace and the ticket zeroed. Gluon has no scalar atomics: the tile's first element takes the
    ticket, and a reduction hands it to every thread of the partition."""
    BLOCK_N: gl.constexpr = acc.shape[0]
    BLOCK_M: gl.constexpr = acc.shape[1]
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ACC_LAYOUT))[:, None]
    columns = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, ACC_LAYOUT))[None, :]
    mask = (off_n + rows < N) & (off_m + columns < M)
    sums = workspace_ptr + (off_m + columns) * N + off_n + rows
    # relaxed, as in int8_gemm.split_k_sum: the barrier and the ticket's acq_rel order the sums
    gl.atomic_add(sums, acc, mask=mask, sem="relaxed")
    partition_barrier()  # every thread's sums are in before the ticket
    first = (rows == 0) & (columns == 0)
    ticket_ptrs = tickets_ptr + tile + rows * 0 + columns * 0
    taken = gl.atomic_add(ticket_ptrs, gl.full_like(acc, 1), mask=first)
    ticket = gl.max(gl.max(gl.where(first, taken, -1), axis=1), axis=0)
    last = ticket == SPLIT_K - 1
    total = acc
    if last:
        total = gl.atomic_xchg(sums, gl.zeros_like(acc), mask=mask, sem="relaxed")
        gl.atomic_xchg(ticket_ptrs, gl.zeros_like(acc), mask=first)
    return total, last


@gluon.jit
def barrier_ring(SLOTS: gl.constexpr):
    """One mbarrier per slot of the ring, each completed by one arrive (or one TMA transaction count)."""
    ring = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(SLOTS):
        mbarrier.init(ring.index(i), count=1)
    return ring


@gluon.jit
def _load_partition(w_desc, a_desc, w_slots, a_slots, ready, empty, M, N, tiles, k_tiles, GROUP_N: gl.constexpr,
                    SLOTS: gl.constexpr, SPLIT_K: gl.constexpr):
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    # each copy steps by its own block's width: a packed int4 weight block is half the activation block's
    W_STEP: gl.constexpr = w_desc.block_type.shape[1]
    A_STEP: gl.constexpr = a_desc.block_type.shape[1]
    step = 0  # over every K step of every work unit of this program: the ring runs on across units
    for unit in range(gl.program_id(0), tiles * SPLIT_K, gl.num_programs(0)):
        tile, first_kt, end_kt = work_unit(unit, k_tiles, SPLIT_K)
        off_n, off_m = _tile_offsets(tile, M, N, BLOCK_N, BLOCK_M, GROUP_N)
        for kt in range(first_kt, end_kt):
            slot = step % SLOTS
            # the first pass over the ring finds every slot free (parity 1 of a fresh barrier counts as completed)
            mbarrier.wait(empty.index(slot), ((step // SLOTS) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), w_desc.block_type.nbytes + a_desc.block_type.nbytes)
            tma_load(w_desc, [off_n, kt * W_STEP], ready.index(slot), w_slots.index(slot))
            tma_load(a_desc, [off_m, kt * A_STEP], ready.index(slot), a_slots.index(slot))
            step += 1


@gluon.jit
def _epilogue(acc, pairs, a_scale_ptr, channel_scale_ptr, bias_ptr, out_ptr, acc_out_ptr, M, N, stride_om, off_n,
              off_m, ACC_LAYOUT: gl.constexpr, X16: gl.constexpr, HAS_BIAS: gl.constexpr, WRITE_ACC: gl.constexpr,
              SILU_MUL: gl.constexpr, NUM_WARPS: gl.constexpr):
    """``int8_gemm.scaled_store`` on the accumulator's layout. ``SILU_MUL``: the rounded outputs go through the
    shared-memory tile ``pairs`` [BLOCK_N, BLOCK_M], read back as [BLOCK_N / 2, 2 * BLOCK_M], whose row j holds
    the gate row 2j, then the up row 2j + 1."""
    BLOCK_N: gl.constexpr = acc.shape[0]
    BLOCK_M: gl.constexpr = acc.shape[1]
    offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ACC_LAYOUT))
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, ACC_LAYOUT))
    n_mask = offs_n < N
    m_mask = offs_m < M
    mask = n_mask[:, None] & m_mask[None, :]
    token_scale = gl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
    channel_scale = gl.load(channel_scale_ptr + offs_n, mask=n_mask, other=0.0)
    if WRITE_ACC:
        if X16:
            true_acc = acc >> 4  # per-channel lanes hold 16 * code; the shift is exact
        else:
            true_acc = acc
        gl.store(acc_out_ptr + offs_m[None, :] * N + offs_n[:, None], true_acc, mask=mask)
    y = acc.to(gl.float32)
    if X16:
        y = y * 0.0625  # exact: the per-channel lanes held 16 * code
    y = (y * token_scale[None, :]) * channel_scale[:, None]
    if HAS_BIAS:
        y = y + gl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(gl.float32)[:, None]
    y = y.to(out_ptr.dtype.element_ty)
    if SILU_MUL:
        PAIR_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NUM_WARPS, 1], [1, 0])
        partition_barrier()  # the previous tile's reads of ``pairs`` are done
        pairs.store(y)
        partition_barrier()
        rows = pairs.reshape([BLOCK_N // 2, 2 * BLOCK_M])
        gate = rows.slice(0, BLOCK_M, dim=1).load(PAIR_LAYOUT)
        up = rows.slice(BLOCK_M, BLOCK_M, dim=1).load(PAIR_LAYOUT)
        offs_j = off_n // 2 + gl.arange(0, BLOCK_N // 2, layout=gl.SliceLayout(1, PAIR_LAYOUT))
        offs_t = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, PAIR_LAYOUT))
        gl.store(out_ptr + offs_t[None, :] * stride_om + offs_j[:, None], silu_times_up(gate, up),
                 mask=(offs_j < N // 2)[:, None] & (offs_t < M)[None, :])
    else:
        gl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], y, mask=mask)


@gluon.jit
def _mma_partition(w_slots, a_slots, ready, empty, pairs, a_scale_ptr, channel_scale_ptr, bias_ptr, out_ptr,
                   acc_out_ptr, workspace_ptr, tickets_ptr, M, N, stride_om, tiles, k_tiles, BLOCK_N: gl.constexpr,
                   BLOCK_M: gl.constexpr, GROUP_N: gl.constexpr, SLOTS: gl.constexpr, ACC_LAYOUT: gl.constexpr,
                   X16: gl.constexpr, HAS_BIAS: gl.constexpr, WRITE_ACC: gl.constexpr, SILU_MUL: gl.constexpr,
                   NUM_WARPS: gl.constexpr, SPLIT_K: gl.constexpr):
    step = 0
    for unit in range(gl.program_id(0), tiles * SPLIT_K, gl.num_programs(0)):
        tile, first_kt, end_kt = work_unit(unit, k_tiles, SPLIT_K)
        off_n, off_m = _tile_offsets(tile, M, N, BLOCK_N, BLOCK_M, GROUP_N)
        acc = gl.zeros((BLOCK_N, BLOCK_M), dtype=gl.int32, layout=ACC_LAYOUT)
        for kt in range(first_kt, end_kt):
            slot = step % SLOTS
            mbarrier.wait(ready.index(slot), (step // SLOTS) & 1)
            acc = warpgroup_mma(w_slots.index(slot), a_slots.index(slot).permute((1, 0)), acc, is_async=True)
            # at most this wgmma in flight: the previous one has read its slot, which goes back to the producer
            acc = warpgroup_mma_wait(1, deps=(acc, ))
            mbarrier.arrive(empty.index((step + SLOTS - 1) % SLOTS), pred=kt > first_kt)
            step += 1
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(empty.index((step + SLOTS - 1) % SLOTS))  # the unit's last slot: the producer runs ahead
        if SPLIT_K == 1:
            _epilogue(acc, pairs, a_scale_ptr, channel_scale_ptr, bias_ptr, out_ptr, acc_out_ptr, M, N, stride_om,
                      off_n, off_m, ACC_LAYOUT, X16, HAS_BIAS, WRITE_ACC, SILU_MUL, NUM_WARPS)
        else:
            total, last = split_k_sum(acc, tile, workspace_ptr, tickets_ptr, off_n, off_m, M, N, ACC_LAYOUT,
                                      SPLIT_K)
            if last:
                _epilogue(total, pairs, a_scale_ptr, channel_scale_ptr, bias_ptr, out_ptr, acc_out_ptr, M, N,
                          stride_om, off_n, off_m, ACC_LAYOUT, X16, HAS_BIAS, WRITE_ACC, SILU_MUL, NUM_WARPS)


@gluon.jit
def int8_gemm_ws_kernel(w_desc, a_desc, a_scale_ptr, channel_scale_ptr, bias_ptr, out_ptr, acc_out_ptr, M, N,
                        stride_om, X16: gl.constexpr, HAS_BIAS: gl.constexpr, WRITE_ACC: gl.constexpr,
                        SILU_MUL: gl.constexpr, GROUP_N: gl.constexpr, SLOTS: gl.constexpr,
                        num_warps: gl.constexpr):
    """Program ``p`` of the grid computes the output tiles ``p, p + grid, ...`` (one each when the grid is the tile
    count; persistent when it is the SM count)."""
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = w_desc.block_type.shape[1]
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    ACC_LAYOUT: gl.constexpr = accumulator_layout(BLOCK_N, BLOCK_M, num_warps)
    tiles, k_tiles = tile_counts(M, N, w_desc.shape[1], BLOCK_N, BLOCK_M, BLOCK_K)

    w_slots = gl.allocate_shared_memory(gl.int8, [SLOTS, BLOCK_N, BLOCK_K], w_desc.layout)
    a_slots = gl.allocate_shared_memory(gl.int8, [SLOTS, BLOCK_M, BLOCK_K], a_desc.layout)
    ready = barrier_ring(SLOTS)
    empty = barrier_ring(SLOTS)
    PAIRS_SHAPE: gl.constexpr = [BLOCK_N, BLOCK_M] if SILU_MUL else [2, 8]  # only SiLU*up reads its outputs back
    pairs = gl.allocate_shared_memory(out_ptr.dtype.element_ty, PAIRS_SHAPE,
                                      gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))

    gl.warp_specialize([
        (_mma_partition, (w_slots, a_slots, ready, empty, pairs, a_scale_ptr, channel_scale_ptr, bias_ptr, out_ptr,
                          acc_out_ptr, acc_out_ptr, acc_out_ptr, M, N, stride_om, tiles, k_tiles, BLOCK_N, BLOCK_M,
                          GROUP_N, SLOTS, ACC_LAYOUT, X16, HAS_BIAS, WRITE_ACC, SILU_MUL, num_warps, 1)),
        (_load_partition, (w_desc, a_desc, w_slots, a_slots, ready, empty, M, N, tiles, k_tiles, GROUP_N, SLOTS,
                           1)),
    ], [1], [24])


def shared_memory_bytes(config: dict, out_bytes: int, silu_mul: bool, weight_bytes: float = 1.0) -> int:
    """The shared memory a ``WS`` config takes: its ring of weight (``weight_bytes`` per element) and activation
    tiles, and the tile of outputs that the SiLU*up epilogue reads back."""
    ring = config["num_stages"] * int(config["BLOCK_N"] * weight_bytes + config["BLOCK_M"]) * config["BLOCK_K"]
    barriers = 1024  # the ring's mbarriers, with alignment to spare
    return ring + (config["BLOCK_N"] * config["BLOCK_M"] * out_bytes if silu_mul else 0) + barriers


def launch_int8_gemm_ws(a_codes, a_scale, weight, channel_scale, bias, out, acc_out, config, x16: bool,
                        write_acc: bool, silu_mul: bool) -> None:
    """``int8_gemm.launch_int8_gemm``'s GEMM on the warp-specialized kernel: ``a_codes`` int8 [M, K] and ``weight``
    int8 [N, K] with 16-byte aligned rows (``int8_gemm.tma_ready``), ``config`` WS 1 (a program per tile) or 2
    (persistent)."""
    m, n = a_codes.shape[0], weight.shape[0]
    block_n, block_m, block_k = config["BLOCK_N"], config["BLOCK_M"], config["BLOCK_K"]
    w_desc = TensorDescriptor.from_tensor(weight, [block_n, block_k],
                                          gl.NVMMASharedLayout.get_default_for([block_n, block_k], gl.int8))
    a_desc = TensorDescriptor.from_tensor(a_codes, [block_m, block_k],
                                          gl.NVMMASharedLayout.get_default_for([block_m, block_k], gl.int8))
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    grid = (min(tiles, current_gpu().sm_count) if config["WS"] == 2 else tiles,)
    int8_gemm_ws_kernel[grid](w_desc, a_desc, a_scale, channel_scale, bias if bias is not None else channel_scale,
                              out, acc_out, m, n, out.stride(0), X16=x16, HAS_BIAS=bias is not None,
                              WRITE_ACC=write_acc, SILU_MUL=silu_mul, GROUP_N=config["GROUP_N"],
                              SLOTS=config["num_stages"], num_warps=config["num_warps"])

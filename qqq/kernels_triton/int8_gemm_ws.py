"""Prototype (branch ``gluon-ws``, not wired into any launcher): the int8 x int8 -> int32 GEMM of ``int8_gemm`` as
a warp-specialized Gluon kernel for Hopper. One producer warp copies the weight and activation tiles into a ring of
shared-memory slots with the TMA unit; the default partition (``num_warps`` warps, two warpgroups at 8) waits for
a slot, issues the asynchronous wgmma on it and hands the previous slot back to the producer once its wgmma has
retired. ``acc[BLOCK_N, BLOCK_M] += W @ A^T`` as in ``int8_gemm``; the epilogue is the plain one of
``int8_gemm.scaled_store`` without bias or SiLU*up: ``out[m, n] = (acc * token_scale[m]) * channel_scale[n]``.

Why: Triton 3.6 leaves ``tl.range(..., warp_specialize=True)`` without effect on sm_90 for both the fused W4A8 loop
and the persistent TMA int8 GEMM (the attribute reaches the TTGIR; no ``ttg.warp_specialize`` region is made), so
warp specialization on Hopper needs Gluon (NOTES.md).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# the TMA copy into shared memory: renamed after Triton 3.6 (the GPU machine's), same arguments
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.constexpr_function
def accumulator_layout(block_n, block_m, num_warps):
    """The wgmma accumulator layout of a [block_n, block_m] int32 tile: warps stacked along the weight rows, the
    widest instruction N (<= 128: sm_90's int8 wgmma lowering in Triton 3.6 rejects N 256) that divides block_m, K 32 (int8)."""
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
def _load_partition(w_desc, a_desc, w_slots, a_slots, ready, empty, M, N, tiles, k_tiles, GROUP_N: gl.constexpr,
                    SLOTS: gl.constexpr):
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = w_desc.block_type.shape[1]
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    step = 0  # over every K step of every tile of this program: the ring runs on across tiles
    for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
        off_n, off_m = _tile_offsets(tile, M, N, BLOCK_N, BLOCK_M, GROUP_N)
        for kt in range(k_tiles):
            slot = step % SLOTS
            # the first pass over the ring finds every slot free (parity 1 of a fresh barrier counts as completed)
            mbarrier.wait(empty.index(slot), ((step // SLOTS) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), w_desc.block_type.nbytes + a_desc.block_type.nbytes)
            tma_load(w_desc, [off_n, kt * BLOCK_K], ready.index(slot), w_slots.index(slot))
            tma_load(a_desc, [off_m, kt * BLOCK_K], ready.index(slot), a_slots.index(slot))
            step += 1


@gluon.jit
def _mma_partition(w_slots, a_slots, ready, empty, a_scale_ptr, channel_scale_ptr, out_ptr, M, N, stride_om, tiles,
                   k_tiles, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, GROUP_N: gl.constexpr,
                   SLOTS: gl.constexpr, ACC_LAYOUT: gl.constexpr):
    step = 0
    for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
        off_n, off_m = _tile_offsets(tile, M, N, BLOCK_N, BLOCK_M, GROUP_N)
        acc = gl.zeros((BLOCK_N, BLOCK_M), dtype=gl.int32, layout=ACC_LAYOUT)
        for kt in range(k_tiles):
            slot = step % SLOTS
            mbarrier.wait(ready.index(slot), (step // SLOTS) & 1)
            acc = warpgroup_mma(w_slots.index(slot), a_slots.index(slot).permute((1, 0)), acc, is_async=True)
            # at most this wgmma in flight: the previous one has read its slot, which goes back to the producer
            acc = warpgroup_mma_wait(1, deps=(acc, ))
            mbarrier.arrive(empty.index((step + SLOTS - 1) % SLOTS), pred=kt > 0)
            step += 1
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(empty.index((step + SLOTS - 1) % SLOTS))  # the tile's last slot: the producer runs ahead

        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ACC_LAYOUT))
        offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, ACC_LAYOUT))
        n_mask = offs_n < N
        m_mask = offs_m < M
        token_scale = gl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
        channel_scale = gl.load(channel_scale_ptr + offs_n, mask=n_mask, other=0.0)
        y = (acc.to(gl.float32) * token_scale[None, :]) * channel_scale[:, None]
        gl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], y.to(out_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & m_mask[None, :])


@gluon.jit
def int8_gemm_ws_kernel(w_desc, a_desc, a_scale_ptr, channel_scale_ptr, out_ptr, M, N, stride_om,
                        GROUP_N: gl.constexpr, SLOTS: gl.constexpr, num_warps: gl.constexpr):
    """Program ``p`` of the grid computes the output tiles ``p, p + grid, ...`` (one each when the grid is the tile
    count; persistent when it is the SM count)."""
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = w_desc.block_type.shape[1]
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    ACC_LAYOUT: gl.constexpr = accumulator_layout(BLOCK_N, BLOCK_M, num_warps)
    tiles = ((N + BLOCK_N - 1) // BLOCK_N) * ((M + BLOCK_M - 1) // BLOCK_M)
    k_tiles = (w_desc.shape[1] + BLOCK_K - 1) // BLOCK_K

    w_slots = gl.allocate_shared_memory(gl.int8, [SLOTS, BLOCK_N, BLOCK_K], w_desc.layout)
    a_slots = gl.allocate_shared_memory(gl.int8, [SLOTS, BLOCK_M, BLOCK_K], a_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(SLOTS):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)

    gl.warp_specialize([
        (_mma_partition, (w_slots, a_slots, ready, empty, a_scale_ptr, channel_scale_ptr, out_ptr, M, N, stride_om,
                          tiles, k_tiles, BLOCK_N, BLOCK_M, GROUP_N, SLOTS, ACC_LAYOUT)),
        (_load_partition, (w_desc, a_desc, w_slots, a_slots, ready, empty, M, N, tiles, k_tiles, GROUP_N, SLOTS)),
    ], [1], [24])


def int8_gemm_ws(a_codes: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, channel_scale: torch.Tensor,
                 out: torch.Tensor, config: dict) -> torch.Tensor:
    """``out`` [M, N] = the epilogue of ``a_codes`` int8 [M, K] x ``weight`` int8 [N, K]^T (both 16-byte aligned
    rows), on the tiles of ``config`` (BLOCK_N, BLOCK_M, BLOCK_K, GROUP_N, num_warps, num_stages as the ring's slots,
    and PERSISTENT: one program per SM instead of one per tile)."""
    m, k = a_codes.shape
    n = weight.shape[0]
    block_n, block_m, block_k = config["BLOCK_N"], config["BLOCK_M"], config["BLOCK_K"]
    w_layout = gl.NVMMASharedLayout.get_default_for([block_n, block_k], gl.int8)
    a_layout = gl.NVMMASharedLayout.get_default_for([block_m, block_k], gl.int8)
    w_desc = TensorDescriptor.from_tensor(weight, [block_n, block_k], w_layout)
    a_desc = TensorDescriptor.from_tensor(a_codes, [block_m, block_k], a_layout)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    grid = (min(tiles, torch.cuda.get_device_properties(out.device).multi_processor_count) if config.get("PERSISTENT")
            else tiles,)
    int8_gemm_ws_kernel[grid](w_desc, a_desc, a_scale, channel_scale, out, m, n, out.stride(0),
                              GROUP_N=config["GROUP_N"], SLOTS=config["num_stages"], num_warps=config["num_warps"])
    return out

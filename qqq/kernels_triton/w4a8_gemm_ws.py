"""The fused W4A8 GEMM (``w4a8_gemm``) as a warp-specialized Gluon kernel for Hopper, with the int4 -> int8
conversion in a partition of its own, off the wgmma's path: a W4A8 config with ``WS`` and without ``DEQUANT`` (path
``fused_ws``; ``w4a8_gemm.fused_ws_ready`` says where it runs). Three partitions share a ring of shared-memory slots:

- the loader (1 warp) copies the packed weight tile [BLOCK_N, BLOCK_K / 2] and the activation tile
  [BLOCK_M, BLOCK_K] of a K step into a slot with the TMA unit (``int8_gemm_ws._load_partition``);
- the converter (``CONVERT_WARPS`` warps) reads the packed tile, unpacks it (per-channel: ``16 * code`` lanes;
  per-group: a lookup in the group's tables where each 64-column chunk lies in one group, else QQQ's
  FusedDequantQuant with the group ratios of each chunk's halves) and stores the int8 weight tile [BLOCK_N, BLOCK_K]
  into the slot's third buffer, in the wgmma's shared-memory layout (``packing.py``: byte b of a 64-column chunk
  holds columns b and b + 32);
- the default partition issues the asynchronous wgmma on the int8 weight and activation buffers and runs the
  epilogue, exactly ``int8_gemm_ws``'s (``_mma_partition``), waiting for the converter instead of the loader.

Each slot passes loader -> converter -> wgmma -> loader through three mbarriers (ready, converted, empty), so the
packed buffer is refilled only after its int8 buffer has been read. With ``SPLIT_K`` each tile's K steps are split
into that many work units (``int8_gemm_ws.work_unit``), whose int32 sums meet in the split-K workspace
(``int8_gemm_ws.split_k_sum``; the last unit runs the epilogue): for the shapes whose tiles leave SMs idle at small
M (Llama-2-7B's o and down have 32 tiles of 128 rows for 132 SMs), where the conversion sets the pace. The register-operand design of branch
``gluon-fused`` kept the unpacking in series with the wgmma (a wait after every chunk: Triton 3.6 cannot list 8-bit
register operands among a wait's dependencies); here the wgmma reads both operands from shared memory.
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from qqq.kernels_triton.gpu import current_gpu
from qqq.kernels_triton import int8_gemm_ws
from qqq.kernels_triton.int8_gemm_ws import (_load_partition, _mma_partition, _tile_offsets, accumulator_layout,
                                             barrier_ring, partition_barrier, tile_counts, work_unit)
from qqq.kernels_triton.unpack import (FUSED_DEQUANT_QUANT_BYTES, FUSED_DEQUANT_QUANT_BYTES_UNCLAMPED,
                                      GROUP_LOOKUP_BYTES, group_tables, ratio_pair)


@gluon.jit
def _unpack_x16(packed):
    """Packed bytes -> (low, high) int8 lanes holding 16 * code, four bytes per instruction (``unpack``'s PTX)."""
    low = gl.inline_asm_elementwise("{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }", "=r,r",
                                    [packed], dtype=gl.int8, is_pure=True, pack=4)
    high = gl.inline_asm_elementwise("and.b32 $0, $1, 0xF0F0F0F0;", "=r,r", [packed], dtype=gl.int8, is_pure=True,
                                     pack=4)
    return low, high


@gluon.jit
def _unpack_group(packed, r_low, r_high, CLAMP: gl.constexpr):
    """Packed bytes [BLOCK_N, CHUNKS, 32] -> (low, high) int8 lanes ``round((q - 8) * ratio)`` by QQQ's
    FusedDequantQuant, with the fp16 ratios of each chunk's low and high nibbles' groups, [BLOCK_N, CHUNKS, 1]
    (their f16x2 pairs from ``unpack.ratio_pair``, a Triton helper that Gluon code can call)."""
    ptx: gl.constexpr = FUSED_DEQUANT_QUANT_BYTES if CLAMP else FUSED_DEQUANT_QUANT_BYTES_UNCLAMPED
    pair_low = gl.broadcast(ratio_pair(r_low), packed)[0]
    pair_high = gl.broadcast(ratio_pair(r_high), packed)[0]
    return gl.inline_asm_elementwise(ptx, "=r,=r,r,r,r,r,r,r,r,r,r", [packed, pair_low, pair_high],
                                     dtype=(gl.int8, gl.int8), is_pure=True, pack=4)


@gluon.jit
def _unpack_group_tables(packed, ratio):
    """Packed bytes [BLOCK_N, CHUNKS, 32] whose chunks each lie in one group, of fp16 ``ratio`` [BLOCK_N, CHUNKS,
    1] or [BLOCK_N, 1, 1] -> the lanes of ``_unpack_group`` with the clamp, through the group's tables
    (``unpack.group_tables``, built once for each ratio): 13 instructions for 8 weights."""
    negative_low, negative_high, positive_low, positive_high = group_tables(ratio, True)
    return gl.inline_asm_elementwise(GROUP_LOOKUP_BYTES, "=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
                                     [packed, gl.broadcast(negative_low, packed)[0],
                                      gl.broadcast(negative_high, packed)[0], gl.broadcast(positive_low, packed)[0],
                                      gl.broadcast(positive_high, packed)[0]],
                                     dtype=(gl.int8, gl.int8), is_pure=True, pack=4)


@gluon.jit
def _group_ratios(ratio_row, kt, n_groups, BLOCK_K: gl.constexpr, GROUP_SIZE: gl.constexpr, layout: gl.constexpr):
    """The fp16 ratios of K step ``kt``'s chunks, [BLOCK_N, CHUNKS, 1] each for the low and the high nibbles
    (``ratio_row``: [BLOCK_N, 1] pointers to the rows' ratios, in ``layout`` sliced at its last dimension, so that
    a thread loads each of its rows' ratios once). A chunk past K (zero codes against zero activations) reads the
    last group's ratios, not past the row. Where a group spans the K step, [BLOCK_N, 1, 1]: one ratio a row (and
    one table set a row in ``_unpack_group_tables``)."""
    if GROUP_SIZE >= BLOCK_K:
        r = gl.load(ratio_row + gl.minimum(kt * BLOCK_K // GROUP_SIZE, n_groups - 1))
        return r[:, :, None], r[:, :, None]
    else:
        chunk = gl.arange(0, BLOCK_K // 64, layout=gl.SliceLayout(0, gl.SliceLayout(2, layout)))[None, :]
        column = kt * BLOCK_K + 64 * chunk
        r_low = gl.load(ratio_row + gl.minimum(column // GROUP_SIZE, n_groups - 1))
        if GROUP_SIZE >= 64:  # a 64-column chunk lies in one group
            r_high = r_low
        else:
            r_high = gl.load(ratio_row + gl.minimum((column + 32) // GROUP_SIZE, n_groups - 1))
        return r_low[:, :, None], r_high[:, :, None]


@gluon.jit
def _convert_partition(packed_slots, w8_slots, ready, converted, ratio_ptr, M, N, n_groups, tiles, k_tiles,
                       BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_SIZE: gl.constexpr,
                       CLAMP: gl.constexpr, GROUP_N: gl.constexpr, SLOTS: gl.constexpr, CONVERT_WARPS: gl.constexpr,
                       SPLIT_K: gl.constexpr):
    # A K step's whole packed tile is loaded, unpacked and stored at once: one load and one store a step, since
    # the compiler puts a barrier of the converter's warps between any two stores into the int8 buffer (it does
    # not tell the slices apart). A thread holds 16 packed bytes of a chunk row, [BLOCK_N, CHUNKS, 32] viewed.
    CHUNKS: gl.constexpr = BLOCK_K // 64
    PACKED_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 1, 16], [16, 1, 2], [CONVERT_WARPS, 1, 1], [2, 1, 0])
    step = 0
    for unit in range(gl.program_id(0), tiles * SPLIT_K, gl.num_programs(0)):
        tile, first_kt, end_kt = work_unit(unit, k_tiles, SPLIT_K)
        off_n, off_m = _tile_offsets(tile, M, N, BLOCK_N, BLOCK_M, GROUP_N)
        rows = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, PACKED_LAYOUT)))
        ratio_row = (ratio_ptr + gl.minimum(rows, N - 1) * n_groups)[:, None]  # rows past N: row N - 1's
        if GROUP_SIZE != -1:  # the ratios are loaded a K step ahead, off the unpacking's path
            r_low, r_high = _group_ratios(ratio_row, first_kt, n_groups, BLOCK_K, GROUP_SIZE, PACKED_LAYOUT)
        for kt in range(first_kt, end_kt):
            slot = step % SLOTS
            mbarrier.wait(ready.index(slot), (step // SLOTS) & 1)
            packed = packed_slots.index(slot).reshape([BLOCK_N, CHUNKS, 32]).load(PACKED_LAYOUT)
            if GROUP_SIZE == -1:
                low, high = _unpack_x16(packed)
            else:
                if GROUP_SIZE >= 64:  # a chunk lies in one group (r_low is r_high)
                    low, high = _unpack_group_tables(packed, r_low)
                else:
                    low, high = _unpack_group(packed, r_low, r_high, CLAMP)
                r_low, r_high = _group_ratios(ratio_row, kt + 1, n_groups, BLOCK_K, GROUP_SIZE, PACKED_LAYOUT)
            # byte b of chunk c holds columns 64 c + b (low nibble) and 64 c + 32 + b (high)
            w8 = gl.permute(gl.join(low, high), (0, 1, 3, 2)).reshape([BLOCK_N, BLOCK_K])
            w8_slots.index(slot).store(w8)
            fence_async_shared()  # the stores, made by threads, are read by the wgmma (the async proxy)
            partition_barrier()  # every converter warp has stored before the one arrive
            mbarrier.arrive(converted.index(slot))
            step += 1


@gluon.jit
def w4a8_gemm_ws_kernel(packed_desc, a_desc, a_scale_ptr, channel_scale_ptr, ratio_ptr, bias_ptr, out_ptr,
                        acc_out_ptr, workspace_ptr, tickets_ptr, M, N, n_groups, stride_om, W8_LAYOUT: gl.constexpr,
                        GROUP_SIZE: gl.constexpr, CLAMP: gl.constexpr, HAS_BIAS: gl.constexpr,
                        WRITE_ACC: gl.constexpr, SILU_MUL: gl.constexpr, GROUP_N: gl.constexpr, SLOTS: gl.constexpr,
                        SPLIT_K: gl.constexpr, CONVERT_WARPS: gl.constexpr, CONVERT_REGS: gl.constexpr,
                        num_warps: gl.constexpr):
    BLOCK_N: gl.constexpr = packed_desc.block_type.shape[0]
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    ACC_LAYOUT: gl.constexpr = accumulator_layout(BLOCK_N, BLOCK_M, num_warps)
    tiles, k_tiles = tile_counts(M, N, a_desc.shape[1], BLOCK_N, BLOCK_M, BLOCK_K)

    packed_slots = gl.allocate_shared_memory(packed_desc.dtype, [SLOTS, BLOCK_N, BLOCK_K // 2], packed_desc.layout)
    a_slots = gl.allocate_shared_memory(gl.int8, [SLOTS, BLOCK_M, BLOCK_K], a_desc.layout)
    w8_slots = gl.allocate_shared_memory(gl.int8, [SLOTS, BLOCK_N, BLOCK_K], W8_LAYOUT)
    ready = barrier_ring(SLOTS)
    converted = barrier_ring(SLOTS)
    empty = barrier_ring(SLOTS)
    PAIRS_SHAPE: gl.constexpr = [BLOCK_N, BLOCK_M] if SILU_MUL else [2, 8]
    pairs = gl.allocate_shared_memory(out_ptr.dtype.element_ty, PAIRS_SHAPE,
                                      gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))

    gl.warp_specialize([
        # the wgmma waits for the converter; the activation the loader copied is visible to it through the
        # converter's wait on ``ready`` and its arrive on ``converted``
        (_mma_partition, (w8_slots, a_slots, converted, empty, pairs, a_scale_ptr, channel_scale_ptr, bias_ptr,
                          out_ptr, acc_out_ptr, workspace_ptr, tickets_ptr, M, N, stride_om, tiles, k_tiles, BLOCK_N,
                          BLOCK_M, GROUP_N, SLOTS, ACC_LAYOUT, GROUP_SIZE == -1, HAS_BIAS, WRITE_ACC, SILU_MUL,
                          num_warps, SPLIT_K)),
        (_load_partition, (packed_desc, a_desc, packed_slots, a_slots, ready, empty, M, N, tiles, k_tiles, GROUP_N,
                           SLOTS, SPLIT_K)),
        (_convert_partition, (packed_slots, w8_slots, ready, converted, ratio_ptr, M, N, n_groups, tiles, k_tiles,
                              BLOCK_N, BLOCK_M, BLOCK_K, GROUP_SIZE, CLAMP, GROUP_N, SLOTS, CONVERT_WARPS, SPLIT_K)),
    ], [1, CONVERT_WARPS], [24, CONVERT_REGS])


# the converter's registers a thread, by its warps: 8 warps leave the wgmma partition of 8 warps its registers
CONVERT_REGS = {4: 80, 8: 56}


def shared_memory_bytes(config: dict, out_bytes: int, silu_mul: bool) -> int:
    """``int8_gemm_ws.shared_memory_bytes`` with a slot's packed and int8 weight tiles: 1.5 bytes a weight."""
    return int8_gemm_ws.shared_memory_bytes(config, out_bytes, silu_mul, weight_bytes=1.5)


def launch_w4a8_gemm_ws(a_codes, a_scale, qweight, channel_scale, group_ratio, bias, group_size, out, acc_out,
                        config, write_acc: bool, clamp: bool, silu_mul: bool, split_k_buffers=None) -> None:
    """W4A8 on checked inputs (``w4a8_gemm``'s): ``a_codes`` int8 [M, K] and ``qweight`` uint8 [N, K / 2]
    (packing.py) with 16-byte aligned rows, the fp16 ``group_ratio`` [N, K / group_size] for per-group weights;
    ``config`` BLOCK_N, BLOCK_M, BLOCK_K (a multiple of 64), GROUP_N, num_warps, num_stages, WS (1: a program per
    work unit, 2: per SM), and optionally SPLIT_K (each tile's K steps in that many work units, capped at the
    steps; ``split_k_buffers`` then holds ``w4a8_gemm.split_k_workspace``'s zeroed workspace and tickets),
    CONVERT_WARPS (4 or 8) and CONVERT_REGS (the converter's registers a thread: ``CONVERT_REGS`` by its warps)."""
    m, n = a_codes.shape[0], qweight.shape[0]
    block_n, block_m, block_k = config["BLOCK_N"], config["BLOCK_M"], config["BLOCK_K"]
    convert_warps = config.get("CONVERT_WARPS", 4)
    packed_desc = TensorDescriptor.from_tensor(qweight, [block_n, block_k // 2],
                                               gl.NVMMASharedLayout.get_default_for([block_n, block_k // 2], gl.uint8))
    a_desc = TensorDescriptor.from_tensor(a_codes, [block_m, block_k],
                                          gl.NVMMASharedLayout.get_default_for([block_m, block_k], gl.int8))
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split_k = min(config.get("SPLIT_K", 1), triton.cdiv(a_codes.shape[1], block_k))
    if split_k > 1 and split_k_buffers is None:
        raise ValueError(f"SPLIT_K={split_k} needs the split-K workspace and tickets")
    workspace, tickets = split_k_buffers if split_k > 1 else (acc_out, acc_out)  # unused without split-K
    units = tiles * split_k
    grid = (min(units, current_gpu().sm_count) if config["WS"] == 2 else units,)
    ratio = group_ratio if group_size != -1 else channel_scale  # any pointer when per-channel
    w4a8_gemm_ws_kernel[grid](packed_desc, a_desc, a_scale, channel_scale, ratio,
                              bias if bias is not None else channel_scale, out, acc_out, workspace, tickets, m, n,
                              a_codes.shape[1] // abs(group_size), out.stride(0),
                              W8_LAYOUT=gl.NVMMASharedLayout.get_default_for([block_n, block_k], gl.int8),
                              GROUP_SIZE=group_size, CLAMP=clamp, HAS_BIAS=bias is not None, WRITE_ACC=write_acc,
                              SILU_MUL=silu_mul, GROUP_N=config["GROUP_N"], SLOTS=config["num_stages"],
                              SPLIT_K=split_k, CONVERT_WARPS=convert_warps,
                              CONVERT_REGS=config.get("CONVERT_REGS", CONVERT_REGS[convert_warps]),
                              num_warps=config["num_warps"])

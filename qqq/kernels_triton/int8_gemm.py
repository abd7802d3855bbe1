"""The plain int8 x int8 -> int32 GEMM with the W4A8 epilogue, weight tile on the left (``acc[BLOCK_N, BLOCK_M]``):
the prefill path of W4A8 (after ``w4a8_gemm.dequantize_int8``) and the W8A8 baseline. ``grouped_tile_ids`` (the
L2-friendly program order) and ``epilogue`` (scales, bias, store) are shared with the fused W4A8 kernel.

Three kernels compute it: ``int8_gemm_kernel``, a program per output tile loading its operands through pointers
(Triton pipelines the loads with ``cp.async``); ``int8_gemm_tma_kernel`` (config ``TMA=1``), persistent: one
program per SM walks the tiles in the same order, its operand tiles copied into shared memory by the TMA unit
(a host tensor descriptor per operand; rows past M or N read as zeros) and its K loop flattened with the tile loop,
so the next tile's copies are in flight during a tile's epilogue; and the warp-specialized Gluon kernel of
``int8_gemm_ws.py`` (config ``WS=1`` or ``2``) on Hopper, where a producer warp keeps the TMA copies ahead of the
wgmma warps. A config runs on the most specialized kernel that can take it here (the Gluon kernel does not run
under the interpreter; the TMA kernels need 16-byte aligned rows) and otherwise on the next one, with the same
tiles and numbers.

``SILU_MUL`` epilogues (a fused gate/up projection whose weight rows alternate gate, up: channel ``2j`` is gate
``j``, ``2j + 1`` is up ``j``) store ``SiLU(gate) * up`` [M, N / 2] instead of the N outputs: each output is
rounded to the output dtype first, then combined as Llama's ``SiLU(gate) * up`` rounds (``silu_times_up``), so
the result is that of the separate SiLU*up producer on the projection's output, without its launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qqq.kernels_triton.gpu import compiled_for_hopper, current_gpu
from qqq.kernels_triton.swiglu import silu_times_up

try:
    from qqq.kernels_triton.int8_gemm_ws import launch_int8_gemm_ws, shared_memory_bytes
except ImportError:  # a Triton without Gluon runs WS configs on the TMA kernel
    launch_int8_gemm_ws = None

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a Triton without host tensor descriptors runs the pointer kernel
    TensorDescriptor = None


@triton.jit
def grouped_tile_ids(N, M, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr):
    """(pid_n, pid_m) of this program: GROUP_N consecutive weight tiles are swept over all activation tiles
    before moving on (L2 reuse)."""
    return tile_coordinates(tl.program_id(0), N, M, BLOCK_N, BLOCK_M, GROUP_N)


@triton.jit
def tile_coordinates(pid, N, M, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr):
    """(pid_n, pid_m) of output tile ``pid`` in the grouped order of :func:`grouped_tile_ids`."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pids_per_group = GROUP_N * num_pid_m
    first_pid_n = (pid // pids_per_group) * GROUP_N
    group_n = tl.minimum(num_pid_n - first_pid_n, GROUP_N)
    return first_pid_n + (pid % pids_per_group) % group_n, (pid % pids_per_group) // group_n


def silu_mul_register_cap(num_warps: int, silu_mul: bool) -> int | None:
    """The registers a thread may use (``maxnreg``) in a tensor-core GEMM with the SiLU*up epilogue: with 8 warps or
    more, the budget of two programs per SM. Unbounded, ptxas overlaps the epilogue's exp and division across the
    tile and takes the fused W4A8 kernel's 256 x 64 x 128 8-warp tiles from 124 registers to 149 (Triton 3.6, sm_90),
    one program per SM instead of two; capped, they compile to the plain kernel's 124 without spills (NOTES.md)."""
    return 65536 // (2 * 32 * num_warps) if silu_mul and num_warps >= 8 else None


@triton.jit
def epilogue(acc, offs_n, offs_m, n_mask, m_mask, a_scale_ptr, channel_scale_ptr, bias_ptr, out_ptr,
             acc_out_ptr, N, stride_om,
             X16: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_ACC: tl.constexpr, SILU_MUL: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] int32 -> out[m, n] = (acc * token_scale[m]) * channel_scale[n] (+ bias[n]).
    ``X16``: the weights were 16 * code (per-channel lanes), undone exactly here. ``SILU_MUL``: see the module."""
    token_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
    channel_scale, bias = channel_operands(offs_n, n_mask, channel_scale_ptr, bias_ptr, HAS_BIAS)
    scaled_store(acc, token_scale, channel_scale, bias, offs_n, offs_m, n_mask, m_mask, out_ptr, acc_out_ptr, N,
                 stride_om, X16, HAS_BIAS, WRITE_ACC, SILU_MUL)


@triton.jit
def channel_operands(offs_n, n_mask, channel_scale_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    """The epilogue's channel scales and bias [BLOCK_N] (fp32; the channel scales again when there is no bias)."""
    channel_scale = tl.load(channel_scale_ptr + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    else:
        bias = channel_scale
    return channel_scale, bias


@triton.jit
def scaled_store(acc, token_scale, channel_scale, bias, offs_n, offs_m, n_mask, m_mask, out_ptr, acc_out_ptr, N,
                 stride_om, X16: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_ACC: tl.constexpr,
                 SILU_MUL: tl.constexpr):
    """:func:`epilogue` with its operands already loaded."""
    mask = n_mask[:, None] & m_mask[None, :]
    if X16:
        true_acc = acc >> 4  # per-channel lanes hold 16 * code; the shift is exact
    else:
        true_acc = acc
    if WRITE_ACC:
        tl.store(acc_out_ptr + offs_m[None, :] * N + offs_n[:, None], true_acc, mask=mask)
    y = acc.to(tl.float32)
    if X16:
        y = y * 0.0625  # exact: float(16 * a) == 16 * float(a)
    y = (y * token_scale[None, :]) * channel_scale[:, None]
    if HAS_BIAS:
        y = y + bias[:, None]
    y = y.to(out_ptr.dtype.element_ty)
    if SILU_MUL:
        _silu_mul_store(y, offs_n, offs_m, m_mask, out_ptr, N, stride_om)
    else:
        tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], y, mask=mask)


@triton.jit
def _silu_mul_store(y, offs_n, offs_m, m_mask, out_ptr, N, stride_om):
    """``SiLU(gate) * up`` of the rounded outputs ``y`` [BLOCK_N, BLOCK_M] whose rows alternate gate, up (a tile
    starts at an even channel: BLOCK_N is even) into ``out`` [M, N / 2]."""
    BLOCK_N: tl.constexpr = y.shape[0]
    BLOCK_M: tl.constexpr = y.shape[1]
    gate, up = tl.split(tl.permute(tl.reshape(y, [BLOCK_N // 2, 2, BLOCK_M]), (0, 2, 1)))
    gate_channel, _ = tl.split(tl.reshape(offs_n, [BLOCK_N // 2, 2]))
    out_ptrs = out_ptr + offs_m[None, :] * stride_om + (gate_channel // 2)[:, None]
    tl.store(out_ptrs, silu_times_up(gate, up), mask=(gate_channel < N)[:, None] & m_mask[None, :])


@triton.jit
def split_k_sum(partial, tile, split_k, workspace_ptr, tickets_ptr, offs_n, offs_m, n_mask, m_mask, N):
    """Split-K: this program's int32 partial sums [BLOCK_N, BLOCK_M] go atomically into the zeroed workspace
    [M, N]. Returns ``(total, last)``: ``last`` for the last of the ``split_k`` programs of ``tile`` to arrive (its
    ticket counter), which reads the exact int32 total back and leaves the workspace and the counter zeroed."""
    mask = n_mask[:, None] & m_mask[None, :]
    ws_ptrs = workspace_ptr + offs_m[None, :] * N + offs_n[:, None]
    # relaxed: the default acq_rel puts a GPU-wide fence and an L1 invalidation around every element's atomic, one
    # after another; the barrier and the ticket's acq_rel order the sums (the order of CUTLASS's semaphores)
    tl.atomic_add(ws_ptrs, partial, mask=mask, sem="relaxed")
    tl.debug_barrier()  # every thread's sums are in before the ticket
    ticket = tl.atomic_add(tickets_ptr + tile, 1)
    last = ticket == split_k - 1  # every partial sum of the tile is in the workspace
    total = partial
    if last:
        total = tl.atomic_xchg(ws_ptrs, 0, mask=mask, sem="relaxed")
        tl.atomic_xchg(tickets_ptr + tile, 0)
    return total, last


@triton.jit
def split_k_epilogue(partial, tile, split_k, workspace_ptr, tickets_ptr, offs_n, offs_m, n_mask, m_mask, a_scale_ptr,
                     channel_scale_ptr, bias_ptr, out_ptr, acc_out_ptr, N, stride_om,
                     X16: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_ACC: tl.constexpr, SILU_MUL: tl.constexpr):
    """:func:`split_k_sum`, then the last program of the tile runs the epilogue."""
    total, last = split_k_sum(partial, tile, split_k, workspace_ptr, tickets_ptr, offs_n, offs_m, n_mask, m_mask, N)
    if last:
        epilogue(total, offs_n, offs_m, n_mask, m_mask, a_scale_ptr, channel_scale_ptr, bias_ptr, out_ptr,
                 acc_out_ptr, N, stride_om, X16, HAS_BIAS, WRITE_ACC, SILU_MUL)


@triton.jit(do_not_specialize=["M"])
def int8_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, channel_scale_ptr, bias_ptr, out_ptr, acc_out_ptr,
    M, N, K, stride_am, stride_wn, stride_om,
    X16: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_ACC: tl.constexpr, SILU_MUL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """Plain int8 x int8 -> int32 GEMM with the W4A8 epilogue, weight tile on the left: the prefill path of
    W4A8 (after ``_dequantize_int8_kernel``) and the W8A8 baseline."""
    pid_n, pid_m = grouped_tile_ids(N, M, BLOCK_N, BLOCK_M, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
    a_ptrs = a_ptr + offs_m[None, :] * stride_am + offs_k[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    for _ in range(0, K // BLOCK_K):
        w = tl.load(w_ptrs, mask=n_mask[:, None], other=0)
        a = tl.load(a_ptrs, mask=m_mask[None, :], other=0)
        acc = tl.dot(w, a, acc=acc, out_dtype=tl.int32)
        w_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    epilogue(acc, offs_n, offs_m, n_mask, m_mask, a_scale_ptr, channel_scale_ptr, bias_ptr, out_ptr,
             acc_out_ptr, N, stride_om, X16, HAS_BIAS, WRITE_ACC, SILU_MUL)


@triton.jit(do_not_specialize=["M", "PROGRAMS"])
def int8_gemm_tma_kernel(
    a_desc, w_desc, a_scale_ptr, channel_scale_ptr, bias_ptr, out_ptr, acc_out_ptr, M, N, K, stride_om, PROGRAMS,
    X16: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_ACC: tl.constexpr, SILU_MUL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """:func:`int8_gemm_kernel`'s GEMM, persistent and TMA-fed (the module note): program ``p`` of ``PROGRAMS``
    computes the tiles ``p, p + PROGRAMS, ...`` of the grouped order."""
    tiles = tl.cdiv(N, BLOCK_N) * tl.cdiv(M, BLOCK_M)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True):
        pid_n, pid_m = tile_coordinates(tile, N, M, BLOCK_N, BLOCK_M, GROUP_N)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
        for kt in range(k_tiles):
            w = w_desc.load([pid_n * BLOCK_N, kt * BLOCK_K])
            a = a_desc.load([pid_m * BLOCK_M, kt * BLOCK_K])
            acc = tl.dot(w, a.T, acc=acc, out_dtype=tl.int32)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        epilogue(acc, offs_n, offs_m, offs_n < N, offs_m < M, a_scale_ptr, channel_scale_ptr, bias_ptr, out_ptr,
                 acc_out_ptr, N, stride_om, X16, HAS_BIAS, WRITE_ACC, SILU_MUL)


def tma_ready(*operands: torch.Tensor) -> bool:
    """Whether this Triton has host tensor descriptors and the int8 operands [rows, K] suit the TMA unit: a
    16-byte aligned start and row stride, contiguous rows."""
    return TensorDescriptor is not None and all(
        t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 and t.stride(1) == 1 for t in operands)


def gluon_kernel_runs(shared_bytes: int, *operands: torch.Tensor) -> bool:
    """Whether a Gluon kernel taking ``shared_bytes`` of shared memory runs on these TMA-copied operands here:
    compiled for a Hopper-or-later GPU (not the interpreter), operands the TMA unit copies, shared memory within the
    GPU's."""
    return (compiled_for_hopper(operands[0]) and tma_ready(*operands)
            and shared_bytes <= current_gpu().shared_memory_per_block)


def ws_ready(a_codes: torch.Tensor, weight: torch.Tensor, config: dict, out_bytes: int, silu_mul: bool) -> bool:
    """Whether the warp-specialized Gluon kernel runs this ``WS`` config here (:func:`gluon_kernel_runs`, the SiLU*up
    epilogue's read-back tile counted)."""
    return launch_int8_gemm_ws is not None and gluon_kernel_runs(shared_memory_bytes(config, out_bytes, silu_mul),
                                                                 a_codes, weight)


def epilogue_width(n: int, silu_mul: bool) -> int:
    """The channels the epilogue writes for ``n`` GEMM channels: ``n``, or ``n / 2`` with ``silu_mul`` (the rows
    alternate gate, up; each pair becomes one ``SiLU(gate) * up``)."""
    if silu_mul and n % 2:
        raise ValueError(f"silu_mul needs gate and up rows in pairs, got {n} output channels")
    return n // 2 if silu_mul else n


def launch_int8_gemm(a_codes, a_scale, weight, channel_scale, bias, out, acc_out, config, x16, write_acc,
                     silu_mul=False) -> str:
    """Run ``config``'s tiles on the warp-specialized kernel where it asks for it (``WS``) and it can run
    (:func:`ws_ready`), else on the TMA kernel where it asks for either and the operands suit the TMA unit
    (:func:`tma_ready`), else on the pointer kernel. Returns the kernel that ran (``int8_gemm_ws``,
    ``int8_gemm_tma`` or ``int8_gemm``), for the branch record."""
    m, k = a_codes.shape
    n = weight.shape[0]
    if config.get("WS", 0) and ws_ready(a_codes, weight, config, out.element_size(), silu_mul):
        launch_int8_gemm_ws(a_codes, a_scale, weight, channel_scale, bias, out, acc_out, config, x16, write_acc,
                            silu_mul)
        return "int8_gemm_ws"
    tiles = triton.cdiv(n, config["BLOCK_N"]) * triton.cdiv(m, config["BLOCK_M"])
    if (config.get("TMA", 0) or config.get("WS", 0)) and tma_ready(a_codes, weight):
        programs = min(tiles, current_gpu().sm_count)
        int8_gemm_tma_kernel[(programs,)](
            TensorDescriptor.from_tensor(a_codes, [config["BLOCK_M"], config["BLOCK_K"]]),
            TensorDescriptor.from_tensor(weight, [config["BLOCK_N"], config["BLOCK_K"]]),
            a_scale, channel_scale, bias if bias is not None else channel_scale, out, acc_out, m, n, k, out.stride(0),
            programs, X16=x16, HAS_BIAS=bias is not None, WRITE_ACC=write_acc, SILU_MUL=silu_mul,
            BLOCK_N=config["BLOCK_N"], BLOCK_M=config["BLOCK_M"], BLOCK_K=config["BLOCK_K"], GROUP_N=config["GROUP_N"],
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
        return "int8_gemm_tma"
    int8_gemm_kernel[(tiles,)](
        a_codes, a_scale, weight, channel_scale, bias if bias is not None else channel_scale, out, acc_out,
        m, n, k, a_codes.stride(0), weight.stride(0), out.stride(0),
        X16=x16, HAS_BIAS=bias is not None, WRITE_ACC=write_acc, SILU_MUL=silu_mul, BLOCK_N=config["BLOCK_N"],
        BLOCK_M=config["BLOCK_M"], BLOCK_K=config["BLOCK_K"], GROUP_N=config["GROUP_N"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return "int8_gemm"

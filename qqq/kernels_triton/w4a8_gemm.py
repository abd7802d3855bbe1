"""W4A8 GEMM: int8 per-token activations x packed int4 weights -> int32 accumulation -> fp16/bf16 out.

One fused kernel serves both weight formats of ``qqq.numerics`` (selected by the constexpr ``GROUP_SIZE``):

- per-channel (``GROUP_SIZE == -1``): signed nibbles become int8 lanes holding ``16 * code`` with one mask
  (high nibble) or one shift (low nibble); the x16 is undone exactly (a power of two) in the epilogue.
- per-group (``GROUP_SIZE`` in 32/64/128/256, QQQ's FusedDequantQuant): ``round_half_even((q - 8) * ratio)``
  formed as int8 in registers; the whole K loop stays in int32 (group scales folded into the int8 weight).

The unpacks (``unpack.py``) have two formulations with the same numbers: PTX on the GPU, plain Triton ops
under the interpreter (CPU tests).

The operands are swapped (``acc[BLOCK_N, BLOCK_M] += W @ A^T``) so that the unpacked weight is the left,
register-resident operand of the Hopper wgmma (IGMMA in the SASS), and the activation tile (K-major) is the
right operand from shared memory. Each packed byte is loaded once (see ``packing.py``): its low nibbles go to
one dot with the activation columns ``k0 + 64c + j`` and its high nibbles to a second dot with the columns
shifted by 32.

Small M (decode) uses the same kernel with a 16-row activation tile, narrow weight tiles, deep pipelines and
optional split-K: the SPLIT_K programs of a tile add their int32 partial sums atomically into a zeroed
workspace and the last one to arrive (a per-tile ticket counter) reads the total back, zeroes the workspace
and runs the epilogue, so the result stays exactly the int32 sum of the spec.

Large M (prefill) may instead take ``DEQUANT=1`` configs: dequantize the packed weight to int8 once
(``_dequantize_int8_kernel``) and run the plain int8 GEMM (``int8_gemm.py``, also the W8A8 baseline; with ``TMA=1``
its persistent TMA-fed kernel).
The tuner picks per (shape, M bucket); on the H100 it picks this at M >= 1024 for per-group.

On Hopper a ``WS`` config without ``DEQUANT`` runs the fused Gluon kernel of ``w4a8_gemm_ws.py`` instead, where the
conversion of the packed tiles runs in warps of its own beside the wgmma; where Gluon cannot run it (the
interpreter, a GPU before Hopper, rows the TMA unit cannot copy, too little shared memory) the same tiles run on
this module's fused kernel.

The launcher ``w4a8_linear`` checks its inputs, quantizes ``x`` per token (``activation_quant``) and picks the
config from ``config_table`` (the tuned JSON cache for this GPU, else a heuristic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qqq import numerics
from qqq.kernels_triton import branches, config_table
from qqq.kernels_triton.activation_quant import quantize_per_token
from qqq.kernels_triton.int8_gemm import (epilogue, epilogue_width, gluon_kernel_runs, grouped_tile_ids,
                                         launch_int8_gemm, silu_mul_register_cap, split_k_epilogue)
from qqq.kernels_triton.packing import PACK_HALF_K, check_packable
from qqq.kernels_triton.unpack import (int8_from_group_codes, int8_from_group_codes_asm, ratio_pair,
                                       unpack_signed_x16, use_inline_asm)
from qqq.kernels_triton.w4a8_gemv import launch_w4a8_gemv

try:
    from qqq.kernels_triton.w4a8_gemm_ws import launch_w4a8_gemm_ws, shared_memory_bytes
except ImportError:  # a Triton without Gluon runs WS configs on the fused Triton kernel
    launch_w4a8_gemm_ws = None

assert PACK_HALF_K == 32, "the kernels hard-code the 32-column nibble distance of packing.py"


def launch_paths(group_size: int) -> tuple[str, ...]:
    """The launch paths of ``w4a8_gemm`` for one weight format (see ``launch_path``)."""
    per_group = ("prefetch",) if group_size != -1 else ()
    wide = ("wide_groups",) if group_size >= 64 else ()
    return ("fused", "fused_ws", "fused_ws_split_k", "split_k", "dequant", "dequant_tma", "dequant_ws", "streaming",
            "streaming_split_k") + per_group + wide


# the launch path of a DEQUANT config, by the int8 GEMM kernel that ran it (int8_gemm.launch_int8_gemm)
DEQUANT_PATHS = {"int8_gemm": "dequant", "int8_gemm_tma": "dequant_tma", "int8_gemm_ws": "dequant_ws"}


def _record(group_size: int, clamp: bool, silu_mul: bool, path: str) -> None:
    branches.record("w4a8_gemm", _branch(path, group_size, clamp))
    if silu_mul:
        branches.record("w4a8_gemm", f"silu_mul/{path}")


def _branch(path: str, group_size: int, clamp: bool) -> str:
    """Per-group weights whose products fit int8 (``ratios_fit_int8``) take the unclamped unpack: its own branch."""
    return f"{path}/g{group_size}" + ("/unclamped" if group_size != -1 and not clamp else "")


# the SiLU*up epilogue is its own variant of each path's kernel (checked per path, per-channel and g128)
LAUNCH_BRANCHES = {"w4a8_gemm": tuple(_branch(path, group, clamp) for group in numerics.SUPPORTED_GROUP_SIZES
                                      for path in launch_paths(group)
                                      for clamp in ((True,) if group == -1 else (True, False)))
                   + tuple(f"silu_mul/{path}" for path in launch_paths(128))}


@triton.jit
def _load_ratios(ratio_row, n_mask, kt, kt_end, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp16 ratios [BLOCK_N] of the low and high nibbles of K tile ``kt`` (clamped into the loop's range),
    for tiles with BLOCK_K <= max(GROUP_SIZE, 64), where each half tile lies in one group."""
    if GROUP_SIZE == -1:
        return 0.0, 0.0
    else:
        k0 = tl.minimum(kt, kt_end - 1) * BLOCK_K
        r_low = tl.load(ratio_row + k0 // GROUP_SIZE, mask=n_mask, other=0.0)
        if GROUP_SIZE >= 64:
            r_high = r_low
        else:
            r_high = tl.load(ratio_row + (k0 + 32) // GROUP_SIZE, mask=n_mask, other=0.0)
        return r_low, r_high


@triton.jit(do_not_specialize=["M", "n_groups"])
def _w4a8_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, channel_scale_ptr, ratio_ptr, bias_ptr, out_ptr,
    workspace_ptr, tickets_ptr, acc_out_ptr,
    M, N, K, n_groups, stride_am, stride_wn, stride_om,
    GROUP_SIZE: tl.constexpr, CLAMP: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_ACC: tl.constexpr,
    SILU_MUL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_N: tl.constexpr, USE_ASM: tl.constexpr, PREFETCH: tl.constexpr,
):
    HALF: tl.constexpr = 32  # packing.PACK_HALF_K: the two nibbles of a byte are 32 columns apart
    pid_k = tl.program_id(1)
    pid_n, pid_m = grouped_tile_ids(N, M, BLOCK_N, BLOCK_M, GROUP_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    offs_byte = tl.arange(0, BLOCK_K // 2)
    # activation columns of the low nibbles: k0 + 64c + j (j < 32); the high nibbles are 32 further
    offs_k_low = (offs_byte // HALF) * (2 * HALF) + offs_byte % HALF
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_byte[None, :]
    a_low_ptrs = a_ptr + offs_m[None, :] * stride_am + offs_k_low[:, None]

    k_tiles = K // BLOCK_K
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt_start = pid_k * tiles_per_split
    kt_end = tl.minimum(kt_start + tiles_per_split, k_tiles)
    w_ptrs += kt_start * (BLOCK_K // 2)
    a_low_ptrs += kt_start * BLOCK_K

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    # PREFETCH: the group ratios of the next tile are loaded one iteration ahead by hand (the pipeliner only
    # pipelines dot operands); this costs Triton's in-register dequant layout (an extra shared-memory round
    # trip), so the tuner chooses per shape.
    ratio_row = ratio_ptr + offs_n * n_groups
    r_low_0, r_high_0 = _load_ratios(ratio_row, n_mask, kt_start, kt_end, GROUP_SIZE, BLOCK_K)
    for kt in range(kt_start, kt_end):
        packed = tl.load(w_ptrs, mask=n_mask[:, None], other=0)
        a_low = tl.load(a_low_ptrs, mask=m_mask[None, :], other=0)
        a_high = tl.load(a_low_ptrs + HALF, mask=m_mask[None, :], other=0)
        if GROUP_SIZE == -1:
            w_low, w_high = unpack_signed_x16(packed, USE_ASM)
        elif GROUP_SIZE >= 2 * HALF and BLOCK_K > GROUP_SIZE:
            # wide tiles: BLOCK_K // GROUP_SIZE groups per tile; byte column b lies in group b // (GROUP_SIZE / 2)
            # of the tile (both nibbles). The ratio is selected per column with where() in the dequant layout.
            first_group = kt * (BLOCK_K // GROUP_SIZE)
            group_of_column = (offs_byte // (GROUP_SIZE // 2))[None, :]
            r = tl.load(ratio_row + first_group, mask=n_mask, other=0.0)
            if USE_ASM:
                pair = tl.broadcast_to(ratio_pair(r)[:, None], (BLOCK_N, BLOCK_K // 2))
                for i in tl.static_range(1, BLOCK_K // GROUP_SIZE):
                    r_i = tl.load(ratio_row + first_group + i, mask=n_mask, other=0.0)
                    pair = tl.where(group_of_column == i, ratio_pair(r_i)[:, None], pair)
                w_low, w_high = int8_from_group_codes_asm(packed, pair, pair, CLAMP)
            else:
                ratio = tl.broadcast_to(r.to(tl.float32)[:, None], (BLOCK_N, BLOCK_K // 2))
                for i in tl.static_range(1, BLOCK_K // GROUP_SIZE):
                    r_i = tl.load(ratio_row + first_group + i, mask=n_mask, other=0.0)
                    ratio = tl.where(group_of_column == i, r_i.to(tl.float32)[:, None], ratio)
                w_low = int8_from_group_codes((packed & 0xF).to(tl.int32), ratio, CLAMP)
                w_high = int8_from_group_codes((packed >> 4).to(tl.int32), ratio, CLAMP)
        else:
            if PREFETCH:
                r_low, r_high = r_low_0, r_high_0
                r_low_0, r_high_0 = _load_ratios(ratio_row, n_mask, kt + 1, kt_end, GROUP_SIZE, BLOCK_K)
            else:
                r_low, r_high = _load_ratios(ratio_row, n_mask, kt, kt_end, GROUP_SIZE, BLOCK_K)
            if USE_ASM:
                pair_low = tl.broadcast_to(ratio_pair(r_low)[:, None], (BLOCK_N, BLOCK_K // 2))
                pair_high = tl.broadcast_to(ratio_pair(r_high)[:, None], (BLOCK_N, BLOCK_K // 2))
                w_low, w_high = int8_from_group_codes_asm(packed, pair_low, pair_high, CLAMP)
            else:
                w_low = int8_from_group_codes((packed & 0xF).to(tl.int32), r_low.to(tl.float32)[:, None], CLAMP)
                w_high = int8_from_group_codes((packed >> 4).to(tl.int32), r_high.to(tl.float32)[:, None], CLAMP)
        acc = tl.dot(w_low, a_low, acc=acc, out_dtype=tl.int32)
        acc = tl.dot(w_high, a_high, acc=acc, out_dtype=tl.int32)
        w_ptrs += BLOCK_K // 2
        a_low_ptrs += BLOCK_K

    if SPLIT_K == 1:
        epilogue(acc, offs_n, offs_m, n_mask, m_mask, a_scale_ptr, channel_scale_ptr, bias_ptr, out_ptr,
                 acc_out_ptr, N, stride_om, GROUP_SIZE == -1, HAS_BIAS, WRITE_ACC, SILU_MUL)
    else:
        split_k_epilogue(acc, pid_m * tl.cdiv(N, BLOCK_N) + pid_n, SPLIT_K, workspace_ptr, tickets_ptr, offs_n, offs_m,
                         n_mask, m_mask, a_scale_ptr, channel_scale_ptr, bias_ptr, out_ptr, acc_out_ptr, N, stride_om,
                         GROUP_SIZE == -1, HAS_BIAS, WRITE_ACC, SILU_MUL)


@triton.jit(do_not_specialize=["n_groups"])
def _dequantize_int8_kernel(w_ptr, ratio_ptr, out_ptr, N, K, n_groups, stride_wn, stride_on,
                            GROUP_SIZE: tl.constexpr, CLAMP: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr):
    """Packed int4 [N, K // 2] -> the int8 weight [N, K] the W4A8 GEMM multiplies (per-channel: 16 * code),
    for the prefill path (dequantize once, then the plain int8 GEMM). BLOCK_K == 64 or <= GROUP_SIZE."""
    HALF: tl.constexpr = 32
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_byte = tl.arange(0, BLOCK_K // 2)
    offs_k_low = pid_k * BLOCK_K + (offs_byte // HALF) * (2 * HALF) + offs_byte % HALF
    n_mask = offs_n < N
    packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + pid_k * (BLOCK_K // 2) + offs_byte[None, :],
                     mask=n_mask[:, None], other=0)
    if GROUP_SIZE == -1:
        w_low, w_high = unpack_signed_x16(packed, USE_ASM)
    else:
        k0 = pid_k * BLOCK_K
        r_low = tl.load(ratio_ptr + offs_n * n_groups + k0 // GROUP_SIZE, mask=n_mask, other=0.0)
        if GROUP_SIZE >= 2 * HALF:
            r_high = r_low
        else:
            r_high = tl.load(ratio_ptr + offs_n * n_groups + (k0 + HALF) // GROUP_SIZE, mask=n_mask, other=0.0)
        if USE_ASM:
            pair_low = tl.broadcast_to(ratio_pair(r_low)[:, None], (BLOCK_N, BLOCK_K // 2))
            pair_high = tl.broadcast_to(ratio_pair(r_high)[:, None], (BLOCK_N, BLOCK_K // 2))
            w_low, w_high = int8_from_group_codes_asm(packed, pair_low, pair_high, CLAMP)
        else:
            w_low = int8_from_group_codes((packed & 0xF).to(tl.int32), r_low.to(tl.float32)[:, None], CLAMP)
            w_high = int8_from_group_codes((packed >> 4).to(tl.int32), r_high.to(tl.float32)[:, None], CLAMP)
    out_ptrs = out_ptr + offs_n[:, None] * stride_on + offs_k_low[None, :]
    tl.store(out_ptrs, w_low, mask=n_mask[:, None])
    tl.store(out_ptrs + HALF, w_high, mask=n_mask[:, None])


def dequantize_int8(qweight, group_ratio, group_size, use_asm: bool, clamp: bool = True) -> torch.Tensor:
    """The int8 weight [N, K] of the GEMM (per-channel lanes hold 16 * code); ``clamp=False`` only when every
    per-group product fits int8 (``numerics.group_products_fit_int8``)."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    out = torch.empty((n, k), dtype=torch.int8, device=qweight.device)
    block_k = 64 if group_size in (32, 64) else 128
    block_n = 64
    ratio = group_ratio if group_size != -1 else qweight
    n_groups = k // group_size if group_size != -1 else 1
    _dequantize_int8_kernel[(triton.cdiv(n, block_n), k // block_k)](
        qweight, ratio, out, n, k, n_groups, qweight.stride(0), out.stride(0),
        GROUP_SIZE=group_size, CLAMP=clamp, BLOCK_N=block_n, BLOCK_K=block_k, USE_ASM=use_asm, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------- launcher

_SPLIT_K_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def split_k_workspace(device: torch.device, acc_elems: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed int32 workspace and ticket counters for split-K, kept per device (the kernel leaves them zeroed
    again, so one allocation serves every call; not safe for concurrent launches on several streams)."""
    cached = _SPLIT_K_WORKSPACES.get(device)
    if cached is None or cached[0].numel() < acc_elems or cached[1].numel() < tiles:
        size = max(acc_elems, 0 if cached is None else cached[0].numel(), 1 << 16)
        counters = max(tiles, 0 if cached is None else cached[1].numel(), 1 << 12)
        cached = (torch.zeros(size, dtype=torch.int32, device=device),
                  torch.zeros(counters, dtype=torch.int32, device=device))
        _SPLIT_K_WORKSPACES[device] = cached
    return cached


def check_weights(qweight, channel_scale, group_ratio, bias, group_size, in_features, device):
    numerics.check_group_size(group_size, in_features)
    check_packable(in_features)
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] != in_features // 2:
        raise ValueError(f"qweight must be uint8 [N, {in_features // 2}] from pack_int4, got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    if not qweight.is_contiguous():
        raise ValueError("qweight must be contiguous")
    n = qweight.shape[0]
    if channel_scale.dtype != torch.float32 or channel_scale.shape != (n,) or not channel_scale.is_contiguous():
        raise ValueError(f"channel_scale must be a contiguous fp32 [{n}] tensor, got {channel_scale.dtype} "
                         f"{tuple(channel_scale.shape)}")
    if group_size == -1:
        if group_ratio is not None and group_ratio.numel() != 0:
            raise ValueError("group_ratio must be None for per-channel weights (group_size -1)")
    else:
        expected = (n, in_features // group_size)
        if group_ratio is None or group_ratio.dtype != torch.float16 or tuple(group_ratio.shape) != expected \
                or not group_ratio.is_contiguous():
            got = None if group_ratio is None else (group_ratio.dtype, tuple(group_ratio.shape))
            raise ValueError(f"group_ratio must be a contiguous fp16 {list(expected)} tensor, got {got}")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}] tensor, got {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("channel_scale", channel_scale), ("group_ratio", group_ratio),
                    ("bias", bias)):
        if t is not None and t.numel() and t.device != device:
            raise ValueError(f"{name} is on {t.device}, the input on {device}")


def fused_ws_ready(a_codes: torch.Tensor, qweight: torch.Tensor, config: dict, out_bytes: int,
                   silu_mul: bool) -> bool:
    """Whether the fused Gluon kernel runs this ``WS`` config here (``int8_gemm.gluon_kernel_runs``)."""
    return launch_w4a8_gemm_ws is not None and gluon_kernel_runs(shared_memory_bytes(config, out_bytes, silu_mul),
                                                                 a_codes, qweight)


def launch_path(config: dict, group_size: int) -> str:
    """The path ``config`` asks for (``dequant_ws`` runs as ``dequant_tma`` where the Gluon kernel cannot run, and
    that as ``dequant`` where the operands do not suit TMA: ``int8_gemm.launch_int8_gemm``; ``fused_ws`` runs as the
    path of the same tiles without ``WS`` where the fused Gluon kernel cannot: ``fused_ws_ready``)."""
    if config.get("DEQUANT", 0):
        return "dequant_ws" if config.get("WS", 0) else "dequant_tma" if config.get("TMA", 0) else "dequant"
    if config.get("WS", 0):
        return "fused_ws_split_k" if config["SPLIT_K"] > 1 else "fused_ws"
    if config.get("GEMV", 0):
        return "streaming_split_k" if config["SPLIT_K"] > 1 else "streaming"
    if config["SPLIT_K"] > 1:
        return "split_k"
    if group_size >= 64 and config["BLOCK_K"] > group_size:
        return "wide_groups"
    return "prefetch" if group_size != -1 and config.get("PREFETCH", 0) else "fused"


def w4a8_gemm(a_codes, a_scale, qweight, channel_scale, group_ratio, bias, group_size, out_dtype,
              config: dict | None = None, return_acc: bool = False, weights_checked: bool = False,
              ratios_fit_int8: bool = False, silu_mul: bool = False):
    """GEMM on already quantized activations: ``a_codes`` int8 [M, K], ``a_scale`` fp32 [M].

    Returns ``out`` [M, N] in ``out_dtype`` (and the exact int32 accumulator [M, N] if ``return_acc``).
    ``weights_checked``: the caller ran ``check_weights`` on these weight tensors once (a layer that owns them),
    so an eager prefill does not pay the Python checks on every call. ``ratios_fit_int8``: the caller knows that
    ``numerics.group_products_fit_int8(codes, group_ratio)`` holds for these weights (true of every weight
    ``numerics.two_level_scales`` makes), so the per-group unpack may skip its clamp to [-127, 127], which then
    never acts; wrong results if it does not hold. ``silu_mul``: the weight rows alternate gate, up (a fused gate/up
    projection) and the result is ``SiLU(gate) * up`` [M, N / 2] (``int8_gemm``'s module note)."""
    if a_codes.dtype != torch.int8 or a_codes.dim() != 2 or a_codes.stride(1) != 1:
        raise ValueError("a_codes must be a 2-D int8 tensor with contiguous rows")
    m, k = a_codes.shape
    if not weights_checked:
        check_weights(qweight, channel_scale, group_ratio, bias, group_size, k, a_codes.device)
    elif qweight.shape[1] * 2 != k:
        raise ValueError(f"activations of width {k} do not match qweight {tuple(qweight.shape)}")
    if a_scale.dtype != torch.float32 or a_scale.shape != (m,):
        raise ValueError(f"a_scale must be fp32 [{m}]")
    n = qweight.shape[0]
    if max(m * k, n * k // 2, m * n) >= 2**31:
        raise ValueError("tensors with 2**31 or more elements are not supported (int32 offsets)")
    out = torch.empty((m, epilogue_width(n, silu_mul)), dtype=out_dtype, device=a_codes.device)
    acc_out = torch.empty((m, n), dtype=torch.int32, device=a_codes.device) if return_acc else out
    if m == 0:
        return (out, acc_out) if return_acc else out
    kernel_name = "w4a8" if group_size == -1 else "w4a8_group"
    if config is None:
        config = config_table.get_config(kernel_name, m, n, k, group_size)
    else:
        config_table.check_config(kernel_name, config, m, n, k, group_size)
    use_asm = use_inline_asm(a_codes)
    clamp = group_size != -1 and not ratios_fit_int8
    if config.get("DEQUANT", 0):  # prefill: dequantize to int8 once, then the plain int8 GEMM
        weight = dequantize_int8(qweight, group_ratio, group_size, use_asm, clamp)
        kernel = launch_int8_gemm(a_codes, a_scale, weight, channel_scale, bias, out, acc_out, config,
                                  group_size == -1, return_acc, silu_mul)
        _record(group_size, clamp, silu_mul, DEQUANT_PATHS[kernel])
        return (out, acc_out) if return_acc else out
    if config.get("WS", 0):
        if fused_ws_ready(a_codes, qweight, config, out.element_size(), silu_mul):
            tiles = triton.cdiv(n, config["BLOCK_N"]) * triton.cdiv(m, config["BLOCK_M"])
            buffers = split_k_workspace(a_codes.device, m * n, tiles) if config["SPLIT_K"] > 1 else None
            launch_w4a8_gemm_ws(a_codes, a_scale, qweight, channel_scale, group_ratio, bias, group_size, out,
                                acc_out, config, return_acc, clamp, silu_mul, split_k_buffers=buffers)
            _record(group_size, clamp, silu_mul, launch_path(config, group_size))
            return (out, acc_out) if return_acc else out
        config = dict(config, WS=0)  # the same tiles on this module's kernels
    _record(group_size, clamp, silu_mul, launch_path(config, group_size))
    if config.get("GEMV", 0):  # decode: the streaming CUDA-core kernel
        block_n, split_k = config["BLOCK_N"], config["SPLIT_K"]
        workspace, tickets = split_k_workspace(a_codes.device, m * n, triton.cdiv(n, block_n)) \
            if split_k > 1 else (out, out)
        launch_w4a8_gemv(a_codes.contiguous(), a_scale, qweight, channel_scale, group_ratio, bias, group_size, out,
                         acc_out, config, workspace, tickets, use_asm, return_acc, clamp, silu_mul)
        return (out, acc_out) if return_acc else out
    block_n, block_m, split_k = config["BLOCK_N"], config["BLOCK_M"], config["SPLIT_K"]
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    if split_k > 1:
        workspace, tickets = split_k_workspace(a_codes.device, m * n, tiles)
    else:
        workspace = tickets = out  # unused
    ratio = group_ratio if group_size != -1 else channel_scale  # any pointer when unused
    n_groups = k // group_size if group_size != -1 else 1
    _w4a8_gemm_kernel[(tiles, split_k)](
        a_codes, a_scale, qweight, channel_scale, ratio, bias if bias is not None else channel_scale, out,
        workspace, tickets, acc_out,
        m, n, k, n_groups, a_codes.stride(0), qweight.stride(0), out.stride(0),
        GROUP_SIZE=group_size, CLAMP=clamp, HAS_BIAS=bias is not None, WRITE_ACC=return_acc, SILU_MUL=silu_mul,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=config["BLOCK_K"], SPLIT_K=split_k,
        GROUP_N=config["GROUP_N"], USE_ASM=use_asm, PREFETCH=int(group_size != -1 and config.get("PREFETCH", 0)),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
        maxnreg=silu_mul_register_cap(config["num_warps"], silu_mul),
    )
    return (out, acc_out) if return_acc else out


def w4a8_linear(x, qweight, channel_scale, group_ratio=None, bias=None, group_size=-1, *,
                config: dict | None = None, return_acc: bool = False, ratios_fit_int8: bool = False):
    """QQQ W4A8 linear: ``x`` [..., K] fp16, bf16 or fp32 -> [..., N] in ``x``'s dtype. Quantizes ``x`` per token,
    then runs the W4A8 GEMM (+ bias); an fp32 input gives the same int8 codes its own way and an fp32 output.

    ``qweight`` = ``pack_int4(codes)`` (uint8 [N, K // 2]); ``channel_scale`` fp32 [N], the true per-channel scale
    of ``qqq.numerics``; ``group_ratio`` fp16 [N, K // group_size] or None when ``group_size == -1``.
    ``return_acc`` also returns the exact int32 accumulator (a test hook); ``ratios_fit_int8`` as in ``w4a8_gemm``."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"w4a8_linear expects fp16, bf16 or fp32 input, got {x.dtype}")
    if x.dim() == 0 or qweight.dim() != 2 or x.shape[-1] != 2 * qweight.shape[1]:
        raise ValueError(f"input of shape {tuple(x.shape)} does not match qweight {tuple(qweight.shape)} "
                         f"(expects last dim {2 * qweight.shape[-1] if qweight.dim() == 2 else '?'})")
    k = x.shape[-1]
    check_weights(qweight, channel_scale, group_ratio, bias, group_size, k, x.device)
    a_codes, a_scale = quantize_per_token(x)
    result = w4a8_gemm(a_codes, a_scale, qweight, channel_scale, group_ratio, bias, group_size, x.dtype,
                       config=config, return_acc=return_acc, ratios_fit_int8=ratios_fit_int8)
    lead = x.shape[:-1]
    if return_acc:
        out, acc = result
        return out.reshape(*lead, -1), acc.reshape(*lead, -1)
    return result.reshape(*lead, -1)


__all__ = ["w4a8_linear", "w4a8_gemm", "check_weights", "dequantize_int8"]

"""Configs of the W4A8 (and baseline) GEMM kernels: candidates, pruning, the per-GPU JSON cache.

A config is a dict ``BLOCK_N, BLOCK_M, BLOCK_K, SPLIT_K, GROUP_N, num_warps, num_stages`` plus the optional
``DEQUANT``, ``PREFETCH``, ``GEMV`` and ``TMA`` (BLOCK_N tiles the weight rows = output features, BLOCK_M the tokens;
``DEQUANT=1`` is the W4A8 prefill path: dequantize the packed weight to int8 once, then the plain int8 GEMM with
these tiles; ``TMA=1`` runs that int8 GEMM (W8A8's, or W4A8's after ``DEQUANT``) as the persistent TMA-fed kernel of
``int8_gemm.py``, ``WS=1`` / ``WS=2`` as the warp-specialized Gluon kernel of ``int8_gemm_ws.py`` with a program per
tile / per SM (without ``DEQUANT``, a W4A8 ``WS`` config runs the fused Gluon kernel of ``w4a8_gemm_ws.py``, which
converts the packed tiles in a partition of its own); ``PREFETCH=1`` loads the per-group ratios one K tile ahead;
``GEMV=1`` is the streaming decode kernel of ``w4a8_gemv.py``, which takes all tokens in one program and reads
BLOCK_K columns per step). Configs are keyed on the kernel name, N, K, group size and a bucketed M (``M_BUCKETS``: 1,
2, then M rounded up to a power of two from 16 to 4096), so one tuning serves a range of batch sizes. Tuned configs
live in ``configs/<gpu name>.json`` beside this file, each file naming the GPU's compute capability and SM count. A
GPU reads its own file first, then the files of tuned GPUs of the same compute capability and SM count (the H100 and
H200 share a chip); a shape without an entry takes the nearest tuned bucket of the same shape, else a heuristic.
Falling back to another GPU's file or to the heuristic is said once, with the command that tunes this GPU.

This module only reads and checks configs; the kernels' launchers import it. The timing that fills the cache
for the current GPU is ``autotune.tune(shapes, ...)`` (the ``qqq tune`` command).
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from pathlib import Path

from qqq.kernels_triton.gpu import current_gpu

CONFIG_DIR = Path(__file__).parent / "configs"
M_BUCKETS = (1, 2, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
STREAMING_M_MAX = 2  # buckets up to this also time the streaming (CUDA-core) W4A8 kernel, w4a8_gemv.py
GEMV_MAX_M = 16  # the most tokens the streaming kernel takes (all of them in one program)
GEMV_SHARED_MEMORY = 64 * 1024  # the streaming kernel's ring stays small enough for several programs per SM
SMALL_M_MAX = 64  # buckets up to this use the decode (split-K) candidate list
KERNELS = ("w4a8", "w4a8_group", "w8a8", "w4a16")
SHARED_MEMORY_RESERVE = 27 * 1024  # of the opt-in shared memory per block, what the pipelined tiles leave free
CONFIG_KEYS = ("BLOCK_N", "BLOCK_M", "BLOCK_K", "SPLIT_K", "GROUP_N", "num_warps", "num_stages", "DEQUANT",
               "PREFETCH", "GEMV", "TMA", "WS", "CONVERT_WARPS")
OPTIONAL_KEYS = {"DEQUANT": 0, "PREFETCH": 0, "GEMV": 0, "TMA": 0, "WS": 0, "CONVERT_WARPS": 4}
CONVERT_WARPS = (4, 8)  # the fused Gluon kernel's converter partition (only its configs set anything but 4)
TMA_MAX_BLOCK = (256, 128)  # a TMA copy's box: at most 256 rows, and (int8) 128 columns, the 128-byte swizzle's width
TMA_MIN_BUCKET = 256  # the M buckets whose candidates include the TMA kernels (persistent and warp-specialized)
# the warp-specialized kernel's candidate tiles (BLOCK_N, BLOCK_M, BLOCK_K, warps, ring slots), each with a program per
# tile and per SM: the best of the H100 probe at M >= 1024 (NOTES.md) and smaller rings for the SiLU*up epilogue's tile
WS_TILES = ((128, 256, 128, 8, 4), (256, 128, 128, 8, 4), (128, 256, 128, 8, 3), (256, 128, 64, 8, 6),
            (128, 256, 64, 8, 6), (128, 128, 128, 8, 4))
# the fused Gluon W4A8 kernel's candidate tiles (same fields), from M = 64: per slot a packed, an int8 and an
# activation tile; the 64-column ones for groups of 32
FUSED_WS_MIN_BUCKET = 64
FUSED_WS_TILES = ((128, 64, 128, 4, 4), (128, 128, 128, 8, 4), (256, 128, 128, 8, 3), (128, 256, 128, 8, 3),
                  (128, 128, 64, 8, 6), (128, 64, 64, 4, 6))
# launch paths (w4a8_gemm.launch_path) newer than some shipped config files: a quick tune times every candidate of
# these besides the shipped configs (the H200 file predates the fused Gluon kernel's split-K work units)
QUICK_TUNE_NEW_PATHS = ("fused_ws_split_k",)
# (name, N, K): the paper's shape and the linear layers of Llama-2-7B, Llama-2-13B, Llama-3-70B (q/k/v and
# gate/up fused); what the shipped configs are tuned for, the GPU suite checks and the speed tables measure
LLAMA_GEMM_SHAPES = (
    ("paper_8192x21760", 8192, 21760),
    ("llama2-7b_qkv", 12288, 4096), ("llama2-7b_o", 4096, 4096),
    ("llama2-7b_gate_up", 22016, 4096), ("llama2-7b_down", 4096, 11008),
    ("llama2-13b_qkv", 15360, 5120), ("llama2-13b_o", 5120, 5120),
    ("llama2-13b_gate_up", 27648, 5120), ("llama2-13b_down", 5120, 13824),
    ("llama3-70b_qkv", 10240, 8192), ("llama3-70b_o", 8192, 8192),
    ("llama3-70b_gate_up", 57344, 8192), ("llama3-70b_down", 8192, 28672),
)
PROGRAMS_PER_SM = 2  # decode grids aim at about two programs per SM


def m_bucket(m: int) -> int:
    for bucket in M_BUCKETS:
        if m <= bucket:
            return bucket
    return M_BUCKETS[-1]


def config_key(kernel: str, n: int, k: int, group_size: int, bucket: int) -> str:
    return f"{kernel}|N={n}|K={k}|g={group_size}|M={bucket}"


def _weight_bytes_per_element(kernel: str) -> float:
    return 1.0 if kernel == "w8a8" else 0.5


def _activation_bytes(kernel: str) -> int:
    return 2 if kernel == "w4a16" else 1


def max_block_k(kernel: str, group_size: int) -> int | None:
    """Per-group kernels: BLOCK_K = 64 for groups of 32 (one ratio per half tile), at most 4 groups per tile
    otherwise (the ratio is selected per column among them)."""
    if kernel == "w4a8_group":
        return 64 if group_size < 64 else min(4 * group_size, 512)
    return None


def check_config(kernel: str, config: dict, m: int, n: int, k: int, group_size: int) -> None:
    """Raise ValueError if ``config`` cannot run this problem (the launcher calls it on explicit configs)."""
    missing = [key for key in CONFIG_KEYS if key not in config and key not in OPTIONAL_KEYS]
    if missing:
        raise ValueError(f"config {config} lacks {missing}")
    block_k = config["BLOCK_K"]
    # every kernel's tiles are power-of-two aranges, and a per-group tile then covers whole groups or lies in one
    if block_k < 64 or block_k & (block_k - 1) or k % block_k:
        raise ValueError(f"BLOCK_K={block_k} must be a power of two of at least 64 that divides K={k}")
    limit = max_block_k(kernel, group_size)
    if config.get("GEMV", 0):
        if kernel not in ("w4a8", "w4a8_group") or config.get("DEQUANT", 0) or m > GEMV_MAX_M:
            raise ValueError(f"GEMV=1 is the streaming W4A8 kernel for at most {GEMV_MAX_M} tokens")
        limit = None  # it reads any number of groups per step
    if config.get("DEQUANT", 0):
        if kernel not in ("w4a8", "w4a8_group") or config["SPLIT_K"] != 1:
            raise ValueError("DEQUANT=1 is a W4A8 prefill config without split-K")
    elif limit is not None and block_k > limit:
        raise ValueError(f"BLOCK_K={block_k} exceeds {limit} for group size {group_size}")
    for option in ("TMA", "WS"):
        if not config.get(option, 0):
            continue
        int8_gemm = kernel == "w8a8" or config.get("DEQUANT", 0)
        fused_ws = option == "WS" and kernel in ("w4a8", "w4a8_group") and not config.get("GEMV", 0) \
            and not int8_gemm
        if not (int8_gemm or fused_ws) or (config["SPLIT_K"] != 1 and not fused_ws):
            raise ValueError(f"{option}={config[option]} runs the int8 GEMM (W8A8, or W4A8 with DEQUANT=1) without "
                             "split-K or, WS only, the fused W4A8 kernel")
        if max(config["BLOCK_N"], config["BLOCK_M"]) > TMA_MAX_BLOCK[0] or block_k > TMA_MAX_BLOCK[1]:
            raise ValueError(f"{option}={config[option]} copies tiles of at most {TMA_MAX_BLOCK[0]} rows and "
                             f"{TMA_MAX_BLOCK[1]} columns, got {config}")
    fused_ws = kernel in ("w4a8", "w4a8_group") and config.get("WS", 0) and not config.get("DEQUANT", 0)
    if config.get("CONVERT_WARPS", 4) not in (CONVERT_WARPS if fused_ws else (4,)):
        raise ValueError(f"CONVERT_WARPS={config['CONVERT_WARPS']}: {' or '.join(map(str, CONVERT_WARPS))} converter "
                         "warps, and only for a W4A8 WS config without DEQUANT (the fused Gluon kernel)")
    if config.get("WS", 0) not in (0, 1, 2):
        raise ValueError(f"WS={config['WS']}: 1 (a program per tile) or 2 (a program per SM)")
    if config.get("WS", 0) and config["BLOCK_N"] < 16 * config["num_warps"]:
        raise ValueError(f"WS needs BLOCK_N >= 16 rows a warp (wgmma), got {config}")
    for key in ("BLOCK_N", "BLOCK_M"):
        if config[key] < 16 or config[key] & (config[key] - 1):
            raise ValueError(f"{key}={config[key]} must be a power of two >= 16")
    if config["SPLIT_K"] < 1 or config["SPLIT_K"] > k // block_k:
        raise ValueError(f"SPLIT_K={config['SPLIT_K']} must be in [1, K // BLOCK_K = {k // block_k}]")


def _fits(kernel: str, cfg: dict) -> bool:
    if cfg.get("GEMV", 0):  # the ring of weight and activation tiles the pipelined loop keeps in shared memory
        ring = cfg["num_stages"] * cfg["BLOCK_K"] * (cfg["BLOCK_N"] // 2 + GEMV_MAX_M)
        return ring <= GEMV_SHARED_MEMORY
    weight_bytes = 1.0 if cfg.get("DEQUANT", 0) else _weight_bytes_per_element(kernel)
    if cfg.get("WS", 0) and kernel in ("w4a8", "w4a8_group") and not cfg.get("DEQUANT", 0):
        weight_bytes = 1.5  # the fused Gluon kernel keeps the packed tile and its int8 conversion
    tile_bytes = cfg["BLOCK_N"] * cfg["BLOCK_K"] * weight_bytes \
        + cfg["BLOCK_M"] * cfg["BLOCK_K"] * _activation_bytes(kernel)
    if cfg["num_stages"] * tile_bytes > current_gpu().shared_memory_per_block - SHARED_MEMORY_RESERVE:
        return False
    accumulator_registers = cfg["BLOCK_N"] * cfg["BLOCK_M"] / (32 * cfg["num_warps"])
    return accumulator_registers <= 128


def _auto_split_k(tiles: int, k_tiles: int) -> int:
    split = 1
    target_programs = PROGRAMS_PER_SM * current_gpu().sm_count
    while split < 16 and tiles * split * 2 <= target_programs and k_tiles // (split * 2) >= 2:
        split *= 2
    return split


def _fused_ws_splits(tiles: int, k_tiles: int) -> tuple[int, ...]:
    """Split-K for a fused Gluon tile (``WS=2``) whose tiles leave SMs idle: the fewest parts, a power of two, that
    give 90% of the SMs a work unit, and twice that (a second wave of smaller units), each part at least 4 K
    steps; none where the tiles fill the SMs."""
    sm_count = current_gpu().sm_count
    split = 1
    while tiles * split < 0.9 * sm_count and k_tiles // (2 * split) >= 4:
        split *= 2
    if split == 1:
        return ()
    return (split, 2 * split) if k_tiles // (2 * split) >= 4 else (split,)


def _ws_candidates(tiles, bucket: int, **fields) -> list[dict]:
    """A warp-specialized config per tile of ``tiles`` (BLOCK_N, BLOCK_M, BLOCK_K, warps, ring slots) that the M
    bucket uses, with a program per tile (``WS=1``) and per SM (``WS=2``), plus ``fields``."""
    return [dict(BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k, SPLIT_K=1, GROUP_N=8, num_warps=warps,
                 num_stages=stages, **fields, WS=ws)
            for (block_n, block_m, block_k, warps, stages), ws in itertools.product(tiles, (1, 2))
            if block_m <= max(64, bucket)]


def candidate_configs(kernel: str, bucket: int, n: int, k: int, group_size: int) -> list[dict]:
    """The pruned list of configs worth timing for one (kernel, M bucket, N, K, group size)."""
    raw = []
    prefetch_options = (0, 1) if kernel == "w4a8_group" else (0,)
    if bucket <= SMALL_M_MAX:
        block_ms = (16,) if bucket <= 16 else (16, 32) if bucket == 32 else (32, 64)
        block_ks = (64, 128, 256, 512) if (max_block_k(kernel, group_size) or 512) <= 64 else (128, 256, 512)
        for block_m in block_ms:
            for block_n, warps in ((32, 4), (64, 4), (128, 8)):
                for block_k in block_ks:
                    for stages in ((4, 8, 12) if block_k <= 256 else (4, 8)):
                        tiles = math.ceil(n / block_n) * math.ceil(bucket / block_m)
                        k_tiles = k // block_k if k % block_k == 0 else 0
                        auto = _auto_split_k(tiles, k_tiles) if k_tiles else 1
                        for split in sorted({1, auto}):
                            for prefetch in prefetch_options:
                                raw.append(dict(BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k, SPLIT_K=split,
                                                GROUP_N=8, num_warps=warps, num_stages=stages, PREFETCH=prefetch))
        if kernel in ("w4a8", "w4a8_group") and bucket <= STREAMING_M_MAX:
            for block_n, block_k, split, stages, warps in itertools.product((16, 32, 64), (256, 512, 1024),
                                                                            (1, 2, 4, 8), (2, 3, 4), (4, 8)):
                raw.append(dict(BLOCK_N=block_n, BLOCK_M=16, BLOCK_K=block_k, SPLIT_K=split, GROUP_N=1,
                                num_warps=warps, num_stages=stages, GEMV=1))
    else:
        large = [  # (BLOCK_N, BLOCK_M, BLOCK_K, warps, stages)
            (128, 128, 128, 8, 3), (128, 128, 128, 8, 4), (256, 128, 128, 8, 3), (128, 256, 128, 8, 3),
            (128, 128, 64, 4, 4), (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (256, 64, 128, 8, 3),
            (128, 128, 128, 4, 3), (256, 128, 64, 8, 4), (128, 256, 64, 8, 4), (128, 64, 256, 4, 3),
            (256, 128, 128, 8, 4), (128, 256, 128, 8, 4), (64, 64, 256, 4, 4), (64, 128, 256, 4, 3),
        ]
        for block_n, block_m, block_k, warps, stages in large:
            if block_m > max(64, bucket):
                continue
            base = dict(BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k, SPLIT_K=1, GROUP_N=8,
                        num_warps=warps, num_stages=stages)
            for prefetch in (prefetch_options if bucket <= 512 else (0,)):
                raw.append(dict(base, PREFETCH=prefetch))
            if kernel in ("w4a8", "w4a8_group") and bucket >= 256:
                raw.append(dict(base, DEQUANT=1))
            if kernel != "w4a16" and bucket >= TMA_MIN_BUCKET and tma_available():
                raw.append(dict(base, DEQUANT=int(kernel != "w8a8"), TMA=1))
        if kernel != "w4a16" and bucket >= TMA_MIN_BUCKET and tma_available():
            raw += _ws_candidates(WS_TILES, bucket, DEQUANT=int(kernel != "w8a8"))
    if kernel in ("w4a8", "w4a8_group") and bucket >= FUSED_WS_MIN_BUCKET and tma_available():
        fused = _ws_candidates(FUSED_WS_TILES, bucket)
        fused += [dict(cfg, SPLIT_K=split) for cfg in fused if cfg["WS"] == 2
                  for split in _fused_ws_splits(math.ceil(n / cfg["BLOCK_N"]) * math.ceil(bucket / cfg["BLOCK_M"]),
                                                k // cfg["BLOCK_K"])]
        raw += fused
        if kernel == "w4a8_group":  # twice the warps for the per-group conversion's arithmetic
            raw += [dict(cfg, CONVERT_WARPS=8) for cfg in fused if cfg["WS"] == 2]
    out, seen = [], set()
    for cfg in raw:
        if kernel in ("w8a8", "w4a16"):
            cfg["SPLIT_K"] = 1  # the baselines have no split-K
        try:
            check_config(kernel, cfg, bucket, n, k, group_size)
        except ValueError:
            continue
        if not _fits(kernel, cfg):
            continue
        for option, default in OPTIONAL_KEYS.items():
            cfg.setdefault(option, default)
        wide_tiles = group_size >= 64 and cfg["BLOCK_K"] > group_size
        if kernel != "w4a8_group" or cfg["DEQUANT"] or cfg["GEMV"] or wide_tiles:
            cfg["PREFETCH"] = 0  # only the per-group fused kernel with one group per half tile prefetches
        key = tuple(cfg[c] for c in CONFIG_KEYS)
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


def shipped_candidates(kernel: str, bucket: int, n: int, k: int, group_size: int) -> list[dict]:
    """The configs of ``candidate_configs`` that a config file of this chip (``config_sources``) holds for this problem
    at ``bucket`` or a neighbouring M bucket, in any BLOCK_M the bucket's list has: a quick tune for a new GPU of a
    tuned chip (about 5 configs a problem of ``experiments/gemm_speed.py``'s shapes, against about 80). Empty when
    no file has the problem (or its configs are no longer candidates)."""
    i = M_BUCKETS.index(bucket)
    shipped = set()
    for path in config_sources():
        configs = _read_config_file(path).get("configs", {})
        for near in M_BUCKETS[max(0, i - 1):i + 2]:
            cfg = configs.get(config_key(kernel, n, k, group_size, near))
            if cfg is not None:
                shipped.add(_without_block_m({**OPTIONAL_KEYS, **cfg}))
    return [cfg for cfg in candidate_configs(kernel, bucket, n, k, group_size) if _without_block_m(cfg) in shipped]


def _without_block_m(cfg: dict) -> tuple:
    return tuple(cfg[key] for key in CONFIG_KEYS if key != "BLOCK_M")


def tma_available() -> bool:
    """Whether this GPU (Hopper or later) and this Triton (host tensor descriptors) run ``TMA=1`` configs."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return int(current_gpu().compute_capability.split(".")[0]) >= 9


def heuristic_config(kernel: str, m: int, n: int, k: int, group_size: int) -> dict:
    """A reasonable config without tuning (also what the CPU interpreter runs)."""
    limit = max_block_k(kernel, group_size) or 512
    if m <= SMALL_M_MAX:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        block_n = 64
        block_k = next(b for b in (256, 128, 64) if b <= limit and k % b == 0)
        tiles = math.ceil(n / block_n) * math.ceil(m / block_m)
        split_k = max(1, _auto_split_k(tiles, k // block_k) // 2)
        cfg = dict(BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k,
                   SPLIT_K=split_k, GROUP_N=8, num_warps=4, num_stages=4, DEQUANT=0)
    else:
        block_k = next(b for b in (128, 64) if b <= limit and k % b == 0)
        dequant = int(kernel == "w4a8_group" and m >= 1024)
        if dequant:
            block_k = 128 if k % 128 == 0 else 64
        cfg = dict(BLOCK_N=128, BLOCK_M=128, BLOCK_K=block_k, SPLIT_K=1, GROUP_N=8, num_warps=8, num_stages=3,
                   DEQUANT=dequant)
    return cfg


# ------------------------------------------------------------------------------------- the JSON cache

def device_name() -> str:
    """The current GPU's name as a file name (``NVIDIA_H100_80GB_HBM3``), ``cpu`` without CUDA."""
    return current_gpu().file_name


_CACHE: dict[str, dict] = {}
_PICKED: dict[tuple, dict] = {}
_WARNED: set[str] = set()


def cache_path(device: str | None = None) -> Path:
    return CONFIG_DIR / f"{device or device_name()}.json"


def _read_config_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data.get("configs"), dict) else {}
    except (OSError, ValueError):
        warnings.warn(f"qqq: ignoring the unreadable config file {path}", stacklevel=3)
        return {}


def config_sources(device: str | None = None) -> list[Path]:
    """The config files this GPU reads, in order: its own, then those of tuned GPUs with the same compute
    capability and SM count."""
    device = device or device_name()
    own = cache_path(device)
    sources = [own] if own.exists() else []
    if device == "cpu":  # the interpreter: no tuned file applies, the heuristic is what the CPU tests check
        return sources
    gpu = current_gpu()
    for path in sorted(CONFIG_DIR.glob("*.json")):
        data = _read_config_file(path) if path != own else {}
        if data.get("compute_capability") == gpu.compute_capability and data.get("sm_count") == gpu.sm_count:
            sources.append(path)
    return sources


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=4)


def load_cache(device: str | None = None) -> dict:
    """The configs this GPU uses: its own file's entries over those of same-chip GPUs' files."""
    device = device or device_name()
    if device not in _CACHE:
        sources = config_sources(device)
        merged: dict = {}
        for path in reversed(sources):
            merged.update(_read_config_file(path).get("configs", {}))
        _CACHE[device] = merged
        if device != "cpu":
            gpu = current_gpu()
            if not sources:
                _warn_once(f"qqq: no tuned kernel configs for {gpu.name} (compute capability "
                           f"{gpu.compute_capability}, {gpu.sm_count} SMs): the W4A8 kernels use a heuristic and may "
                           "run far slower; run `qqq tune MODEL` once to tune them for this GPU")
            elif sources[0] != cache_path(device):
                _warn_once(f"qqq: no tuned kernel configs for {gpu.name}; using those of "
                           f"{', '.join(p.stem for p in sources)} (same compute capability and SM count); "
                           "run `qqq tune MODEL` once to tune them for this GPU")
    return _CACHE[device]


def get_config(kernel: str, m: int, n: int, k: int, group_size: int) -> dict:
    """The tuned config for this problem on this GPU, the nearest tuned M bucket's, or the heuristic."""
    picked = _PICKED.get((kernel, m, n, k, group_size))
    if picked is not None:
        return picked
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    picked = _pick_config(kernel, m, n, k, group_size)
    _PICKED[(kernel, m, n, k, group_size)] = picked
    return picked


def _pick_config(kernel: str, m: int, n: int, k: int, group_size: int) -> dict:
    cache = load_cache()
    bucket = m_bucket(m)
    cfg = cache.get(config_key(kernel, n, k, group_size, bucket))
    if cfg is None:
        near = [b for b in M_BUCKETS if config_key(kernel, n, k, group_size, b) in cache
                and (b <= SMALL_M_MAX) == (bucket <= SMALL_M_MAX)]
        if near:  # the nearest tuned bucket, the larger one on a tie (its BLOCK_M covers M in one tile)
            best = min(near, key=lambda b: (abs(math.log2(b) - math.log2(bucket)), -b))
            cfg = cache[config_key(kernel, n, k, group_size, best)]
    if cfg is not None:
        cfg = dict(cfg)
        if cfg["BLOCK_M"] > max(16, triton_next_power_of_2(m)):
            cfg["BLOCK_M"] = max(16, triton_next_power_of_2(m))
        try:
            check_config(kernel, cfg, m, n, k, group_size)
            return cfg
        except ValueError:
            pass
    return heuristic_config(kernel, m, n, k, group_size)


def triton_next_power_of_2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())

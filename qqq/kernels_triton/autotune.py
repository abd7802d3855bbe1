"""Autotuning of the GEMM kernels' configs on the current GPU (CUDA): every candidate of ``config_table`` is
timed in a CUDA graph over rotating weight buffers (so the weights do not stay in L2), and the winners are merged
into this GPU's JSON file under ``configs/``. ``tune(shapes, ...)`` is the ``qqq tune`` command.

The int8-activation kernels are timed as the linear a model runs them: the activation's quantization launch,
then the GEMM. Under programmatic launch a streaming GEMM reads its first weights before it waits for the kernel
in front of it; timed back to back, that read overlapped the previous GEMM instead of a short producer, and
the tuner's times and the linears' times of ``experiments/gemm_speed.py`` disagreed by up to 45% (NOTES.md).
A fused gate/up shape (``tune``'s ``silu_mul``) is timed with the ``SiLU(gate) * up`` epilogue that
``qqq.fast``'s W4A8 and W8A8 MLPs run it with; a config key has no such flag, so the shape's winner is the one for
that epilogue.

It imports the kernels it times; the kernels read their configs from ``config_table`` and never import this
module (only the CLI, the experiments and the tests do).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch
import triton

from qqq.kernels_triton import baselines, config_table, w4a8_gemm
from qqq.kernels_triton.activation_quant import quantize_per_token
from qqq.kernels_triton.config_table import (CONFIG_KEYS, M_BUCKETS, cache_path, candidate_configs, config_key,
                                             device_name, heuristic_config, m_bucket, shipped_candidates)
from qqq.kernels_triton.gpu import current_gpu
from qqq.kernels_triton.packing import pack_int4


class Shape(NamedTuple):
    """A GEMM shape to tune: N (output features), K and the group size (-1: per-channel); ``silu_mul`` for a fused
    gate/up shape, timed with the SiLU*up epilogue its MLP runs."""
    n: int
    k: int
    group_size: int
    silu_mul: bool = False


class CompileJob(NamedTuple):
    """One kernel config to compile: on the problem (kernel, N, K, group size, M), with the SiLU*up epilogue or not."""
    kernel: str
    n: int
    k: int
    group_size: int
    m: int
    config: dict
    silu_mul: bool = False


def time_cuda_graph(calls, repeats: int = 20, warmup: int = 3) -> float:
    """Median time in microseconds of one call, for a list of zero-argument callables run back to back
    (each on its own weight buffer, so the weights do not stay in L2), captured once in a CUDA graph."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / len(calls))
    del graph
    return statistics.median(times)


def rotation_count(bytes_per_buffer: int, l2_bytes: int | None = None) -> int:
    """How many weight buffers to rotate so that together they are three times the L2."""
    l2_bytes = l2_bytes or current_gpu().l2_bytes
    return max(2, min(32, math.ceil(3 * l2_bytes / max(bytes_per_buffer, 1))))


def _problem(kernel: str, m: int, n: int, k: int, group_size: int, buffers: int, silu_mul: bool = False,
             device: str = "cuda"):
    """Random inputs and a ``run(config, buffer_index)`` for one problem of a kernel: the activation's
    quantization, then the GEMM (``silu_mul``: with the SiLU*up epilogue, [M, N / 2] out; W4A16 has none)."""
    scale = torch.rand(n, device=device) * 1e-2
    x16 = torch.randn(m, k, device=device, dtype=torch.float16)
    weights = []
    for _ in range(buffers):
        if kernel == "w8a8":
            weights.append(torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device))
        elif kernel == "w4a8_group":
            weights.append(pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device)))
        else:
            weights.append(pack_int4(torch.randint(-7, 8, (n, k), dtype=torch.int8, device=device)))
    # ratios in [1, 127 / 8]: every |(q - 8) * ratio| fits int8, as for the weights of ``numerics.two_level_scales``,
    # so the per-group kernels run (and are timed) without the clamp, as a ``QQQLinear`` runs them
    ratio = (torch.rand(n, k // group_size, device=device) * (127 / 8 - 1) + 1).half() if kernel == "w4a8_group" \
        else None

    def run(cfg, i):
        if kernel == "w4a16":
            return baselines.w4a16_linear(x16, weights[i], scale, None, config=cfg)
        a_codes, a_scale = quantize_per_token(x16)
        if kernel == "w8a8":
            return baselines.w8a8_gemm(a_codes, a_scale, weights[i], scale, None, x16.dtype, config=cfg,
                                       silu_mul=silu_mul)
        return w4a8_gemm.w4a8_gemm(a_codes, a_scale, weights[i], scale, ratio, None, group_size, x16.dtype,
                                   config=cfg, ratios_fit_int8=kernel == "w4a8_group", silu_mul=silu_mul)

    return run


def _problem_of(job: CompileJob) -> tuple:
    """The problem a job compiles its config on: (kernel, N, K, group size, M, SiLU*up epilogue)."""
    return job.kernel, job.n, job.k, job.group_size, job.m, job.silu_mul


def _problem_first(job: CompileJob) -> tuple:
    """The order of ``precompile``'s jobs: by problem, then by config, so a worker builds each problem once."""
    return _problem_of(job) + (json.dumps(job.config, sort_keys=True),)


def _compile_worker(jobs) -> int:
    run, problem, failed = None, None, 0
    for job in jobs:
        if _problem_of(job) != problem:  # jobs come sorted, so each problem is built once
            problem = _problem_of(job)
            run = _problem(job.kernel, job.m, job.n, job.k, job.group_size, 1, silu_mul=job.silu_mul)
        try:
            run(job.config, 0)
            torch.cuda.synchronize()
        except Exception:
            failed += 1
    return failed


def precompile(jobs, workers: int | None = None) -> int:
    """Compile ``jobs`` (``CompileJob`` fields each: ``(kernel, N, K, group_size, M, config)``, optionally
    ``silu_mul`` last) in parallel processes into Triton's on-disk cache, so a timing loop or a test only loads them
    (the kernels do not specialize on M, so one M serves all; fp16 outputs). Returns how many failed to compile or
    run."""
    jobs = sorted((CompileJob(*job) for job in jobs), key=_problem_first)
    if not jobs:
        return 0
    workers = max(1, min(workers or min(14, (os.cpu_count() or 2) - 2), len(jobs)))
    size = math.ceil(len(jobs) / workers)
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    with ProcessPoolExecutor(len(chunks), mp_context=multiprocessing.get_context("spawn")) as pool:
        return sum(pool.map(_compile_worker, chunks))


def tune_problem(kernel: str, m: int, n: int, k: int, group_size: int, repeats: int = 10,
                 timings: list | None = None, silu_mul: bool = False,
                 candidates: list[dict] | None = None) -> tuple[dict, float]:
    """Time every config of ``candidates`` (default: ``candidate_configs``) on one problem; return the best and its
    time (us). Every timing is appended to ``timings`` as ``(config, us)`` when given."""
    bucket = m_bucket(m)
    if candidates is None:
        candidates = candidate_configs(kernel, bucket, n, k, group_size)
    if not candidates:
        return heuristic_config(kernel, m, n, k, group_size), float("nan")
    buffers = rotation_count(int(n * k * config_table._weight_bytes_per_element(kernel)))
    run = _problem(kernel, m, n, k, group_size, buffers, silu_mul=silu_mul)
    best, best_us = None, float("inf")
    for cfg in candidates:
        try:
            us = time_cuda_graph([lambda i=i: run(cfg, i) for i in range(buffers)], repeats=repeats)
        except Exception as err:  # a config the compiler rejects (resources) is skipped
            print(f"  skip {cfg}: {type(err).__name__}: {str(err)[:120]}")
            continue
        if timings is not None:
            timings.append((cfg, us))
        if us < best_us:
            best, best_us = cfg, us
    return best or heuristic_config(kernel, m, n, k, group_size), best_us


def check_launch_paths(paths) -> None:
    """``tune``'s ``new_paths``: each must name a launch path of ``w4a8_gemm`` (``ValueError`` otherwise)."""
    known = sorted(set(w4a8_gemm.launch_paths(-1) + w4a8_gemm.launch_paths(128)))
    unknown = sorted(set(paths) - set(known))
    if unknown:
        raise ValueError(f"W4A8 launch paths are {', '.join(known)}; no W4A8 launch path named {unknown}")


def tune(shapes, m_values=M_BUCKETS, kernels=None, path: str | Path | None = None, verbose: bool = True,
         timings: list | None = None, shipped_only: bool = False, new_paths: tuple[str, ...] = ()) -> dict:
    """Autotune W4A8 kernels for ``shapes`` (``Shape`` fields each: ``(N, K, group_size)``, group_size -1 =
    per-channel; ``(N, K, group_size, True)`` for a fused gate/up shape, timed with its SiLU*up epilogue) over the M
    buckets of ``m_values`` and merge the winners into the JSON cache of the current GPU.

    ``kernels`` defaults to the W4A8 kernel that matches each group size; pass e.g. ``("w8a8", "w4a16")`` to
    tune the baselines of per-channel shapes too. ``path`` overrides the JSON file; ``timings`` (a list)
    collects every measured ``(kernel, N, K, group_size, bucket, config, us)``. ``shipped_only``: time only the
    configs this chip's files already hold for each problem (``config_table.shipped_candidates``), all candidates
    where they hold none; ``new_paths`` adds every candidate of these ``w4a8_gemm.launch_path`` paths (a kernel path
    newer than the files). Returns {key: config}."""
    check_launch_paths(new_paths)
    if not torch.cuda.is_available():
        raise RuntimeError("tune() needs a CUDA GPU")
    device = device_name()
    path = Path(path) if path else cache_path(device)
    existing = config_table._read_config_file(path).get("configs", {}) if path.exists() else {}
    tuned = {}
    compiled = set()

    def candidates(kernel, bucket, n, k, group_size):
        every = candidate_configs(kernel, bucket, n, k, group_size)
        shipped = shipped_candidates(kernel, bucket, n, k, group_size) if shipped_only else []
        if not shipped or kernel not in ("w4a8", "w4a8_group"):
            return shipped or every
        return shipped + [cfg for cfg in every if cfg not in shipped
                          and w4a8_gemm.launch_path(cfg, group_size) in new_paths]

    for n, k, group_size, silu_mul in (Shape(*shape) for shape in shapes):
        names = kernels or (("w4a8",) if group_size == -1 else ("w4a8_group",))
        for kernel in names:
            if (kernel == "w4a8_group") != (group_size != -1):
                continue
            epilogue = silu_mul and kernel != "w4a16"  # the FP16-activation MLPs keep the SiLU*up producer
            jobs = {}
            chosen = {bucket: candidates(kernel, bucket, n, k, group_size)
                      for bucket in sorted({m_bucket(m) for m in m_values})}
            for bucket, configs in chosen.items():
                for cfg in configs:
                    sig = (kernel, group_size, epilogue) + tuple(cfg.get(c, 0) for c in CONFIG_KEYS)
                    if sig not in compiled:
                        compiled.add(sig)
                        jobs[sig] = (bucket, cfg)
            if jobs:
                t0 = time.time()
                precompile([CompileJob(kernel, n, k, group_size, bucket, cfg, epilogue)
                            for bucket, cfg in jobs.values()])
                if verbose:
                    print(f"compiled {len(jobs)} {kernel} configs in {time.time() - t0:.0f} s", flush=True)
            for bucket, configs in chosen.items():
                t0 = time.time()
                measured = []
                cfg, us = tune_problem(kernel, bucket, n, k, group_size, timings=measured, silu_mul=epilogue,
                                       candidates=configs)
                if timings is not None:
                    timings.extend((kernel, n, k, group_size, bucket, c, t) for c, t in measured)
                key = config_key(kernel, n, k, group_size, bucket)
                tuned[key] = dict(cfg, time_us=round(us, 2))
                if verbose:
                    timed = " (SiLU*up epilogue)" if epilogue else ""
                    print(f"tuned {key}{timed}: {us:.1f} us {cfg} ({len(configs)} configs, {time.time() - t0:.0f} s)",
                          flush=True)
            _save(path, existing, tuned)  # after every shape, so an interrupted run keeps what it tuned
    _save(path, existing, tuned)
    return tuned


def _save(path: Path, existing: dict, tuned: dict) -> None:
    existing.update(tuned)
    config_table._PICKED.clear()  # the next launch reads the new file
    config_table._CACHE.pop(device_name(), None)
    gpu = current_gpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps({"device": gpu.name, "compute_capability": gpu.compute_capability,
                                   "sm_count": gpu.sm_count, "torch": torch.__version__,
                                   "triton": triton.__version__, "configs": existing}, indent=1, sort_keys=True))
    partial.replace(path)  # never a half-written config file

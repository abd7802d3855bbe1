"""The ``qqq`` command line: quantize, eval (ppl, zeroshot), demo, generate, export, tune."""

from __future__ import annotations

import argparse
import math
import re
import signal
import sys
import threading
import time

import torch

from qqq.data import calibration_windows, dataset_names, evaluation_protocol, load_text, perplexity_windows, tokenize
from qqq.export import DEFAULT_MAX_SHARD_SIZE, EXPORT_FORMATS
from qqq.gptq import GPTQConfig, add_clip_arguments, clip_searches
from qqq.kernels_triton.packing import PACK_CHUNK_K
from qqq.key_smoothing import CALIBRATION_TEXT, DEFAULT_ALPHA, smooth_attention_calibrated
from qqq.model_families import family_for_type
from qqq.fast.attention import KV_BITS
from qqq.fast.projections import METHODS as FAST_METHODS
from qqq.fast.projections import RENAMED_METHODS as RENAMED_FAST_METHODS
from qqq.models import (EMBEDDED_MODEL, EMBEDDED_MODELS, embedded_note, is_qqq_checkpoint, load_model, load_tokenizer,
                        model_config, source_dtype)
from qqq.numerics import SUPPORTED_GROUP_SIZES
from qqq.pipeline import (DEMO_CALIBRATION, METHOD_ALIASES, METHODS, PAPER_CALIBRATION, QuantizeSettings,
                          calibration_settings, default_device, get_method, quantize_model)
from qqq.zeroshot import EXTRA_TASKS, TASKS

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CPU_EVAL_WINDOWS = 8  # perplexity on the CPU scores this many windows unless told otherwise (a few minutes)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none or its help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default is None or action.default is False or action.default == argparse.SUPPRESS
                or "default" in text or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def window_count(text: str) -> int | str:
    return "all" if text == "all" else positive_int(text)


def method_name(text: str) -> str:
    """A quantization method of ``qqq.pipeline`` (or an alias), checked when the flags are read."""
    try:
        get_method(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def unit_fraction(text: str) -> float:
    """A migration strength or exponent in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def shard_size(text: str) -> str:
    """A safetensors shard size with its unit, such as 5GB or 500MB (what ``save_pretrained`` parses)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)\s*", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size with its unit, like 5GB or 500MB, got {text!r}")
    return text


def _add_model_arguments(parser: argparse.ArgumentParser, device_use: str = "calibration and evaluation") -> None:
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="dtype the model computes in (default: float16 when --device is CUDA, float32 on "
                             "the CPU; a saved checkpoint keeps the dtype of the model it came from)")
    parser.add_argument("--device", default=None, help=f"device for {device_use} (default: cuda if any, else cpu)")


def _add_eval_arguments(parser: argparse.ArgumentParser, default_windows: int | None) -> None:
    parser.add_argument("--eval-dataset", default="exllamav2-wiki",
                        help=f"perplexity text: one of {dataset_names()} or a .txt/.jsonl file")
    parser.add_argument("--eval-seqlen", type=positive_int, default=2048, help="perplexity window length in tokens")
    parser.add_argument("--eval-windows", type=window_count, default=default_windows,
                        help="score only the first N windows, or 'all' (the full protocol)" + (
                            f" (default: all on a GPU, the first {CPU_EVAL_WINDOWS} on the CPU)"
                            if default_windows is None else ""))


def _add_quantize_arguments(parser: argparse.ArgumentParser, group_size: int = -1, **calibration: int) -> None:
    parser.add_argument("--method", default="qqq",
                        help=f"one of {sorted(METHODS)} (aliases: {', '.join(METHOD_ALIASES)})")
    parser.add_argument("--group-size", type=int, default=group_size, choices=SUPPORTED_GROUP_SIZES,
                        help="weight group size, -1 = per-channel")
    parser.add_argument("--calib-dataset", default="exllamav2-c4",
                        help=f"calibration text: one of {dataset_names()} or a .txt/.jsonl file")
    parser.add_argument("--paper-settings", action="store_true",
                        help="the paper's calibration: 128 x 2048-token windows, 8 sequences for smoothing")
    for flag, help_text in (("--nsamples", "calibration windows"), ("--seqlen", "calibration window length"),
                            ("--smooth-samples", "windows used by the smoothing search")):
        key = flag[2:].replace("-", "_")
        if key not in calibration:  # else the command's own default, shown by HelpFormatter
            help_text += f" (default: {DEMO_CALIBRATION[key]}, with --paper-settings {PAPER_CALIBRATION[key]})"
        parser.add_argument(flag, type=positive_int, default=calibration.get(key), help=help_text)
    add_clip_arguments(parser)
    parser.add_argument("--no-act-order", action="store_true", help="GPTQ: quantize columns in natural order")
    parser.add_argument("--alpha", type=unit_fraction, default=0.5, help="SmoothQuant migration strength, in [0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows' sampling")


def _calibration(args) -> dict:
    settings = calibration_settings(args.paper_settings, nsamples=args.nsamples, seqlen=args.seqlen,
                                    smooth_samples=args.smooth_samples)
    if settings["smooth_samples"] > settings["nsamples"]:
        raise ValueError(f"--smooth-samples {settings['smooth_samples']} exceeds the {settings['nsamples']} "
                         "calibration windows (--nsamples) it is taken from")
    return settings


def _token_ids(tokenizer, source: str, split: str, vocab_size: int | None, flag: str) -> torch.Tensor:
    """The tokens of data set ``source``, checked against the model's vocabulary; errors name ``flag``."""
    try:
        ids = tokenize(tokenizer, load_text(source, split=split))
    except (ValueError, OSError, RuntimeError) as error:  # a bad file, or a hub data set without internet
        raise ValueError(f"{flag} {source}: {error}") from error
    if ids.numel() == 0:
        raise ValueError(f"{flag} {source}: the text gives no tokens")
    _check_tokenizer_fits(vocab_size, ids=ids)
    return ids


def _check_group_size(config: dict, group_size: int, model_name: str, packed: bool) -> None:
    """Before any weight is loaded: ``group_size`` must divide the input size of every decoder linear, and a
    packed W4A8 format needs input sizes in whole chunks of 64 columns."""
    inputs = sorted({k for _, k in linear_shapes(config)})
    if packed and any(k % PACK_CHUNK_K for k in inputs):
        raise ValueError(f"{model_name}'s layers have input sizes {inputs}: the packed W4A8 format needs multiples "
                         f"of {PACK_CHUNK_K} (the int4 layout packs columns in chunks of {PACK_CHUNK_K})")
    fits = [g for g in SUPPORTED_GROUP_SIZES if g == -1 or all(k % g == 0 for k in inputs)]
    if group_size not in fits:
        raise ValueError(f"--group-size {group_size} does not divide the input sizes {inputs} of {model_name}'s "
                         f"layers; choose one of {fits}")


def _check_tokenizer_fits(vocab_size: int | None, tokenizer=None, ids: torch.Tensor | None = None) -> None:
    """The tokenizer does not belong to the model where it has more entries than the model's vocabulary
    (``tokenizer``), or gave a token id past it (``ids``, what it made of a text)."""
    if vocab_size is None:
        return
    if tokenizer is not None and len(tokenizer) > vocab_size:
        found = f"has {len(tokenizer)} entries"
    elif ids is not None and ids.numel() and int(ids.max()) >= vocab_size:
        found = f"gives token id {int(ids.max())}"
    else:
        return
    raise ValueError(f"the tokenizer {found} but the model's vocabulary has {vocab_size} entries: the tokenizer in "
                     "the folder does not belong to the model")


def _calibration_ids(tokenizer, args, vocab_size: int | None) -> torch.Tensor:
    calibration = _calibration(args)
    ids = _token_ids(tokenizer, args.calib_dataset, "train", vocab_size, "--calib-dataset")
    try:
        return calibration_windows(ids, calibration["nsamples"], calibration["seqlen"], args.seed)
    except ValueError as error:
        raise ValueError(f"--calib-dataset {args.calib_dataset}: {error} (--seqlen)") from error


def _evaluation_windows(tokenizer, args, device: torch.device, vocab_size: int | None, label: str) -> torch.Tensor:
    """The perplexity windows, cut before any model is loaded; says how many of how many will be scored."""
    ids = _token_ids(tokenizer, args.eval_dataset, "test", vocab_size, "--eval-dataset")
    limit = args.eval_windows
    if limit is None:
        limit = "all" if device.type == "cuda" else CPU_EVAL_WINDOWS
    try:
        every = perplexity_windows(ids, args.eval_dataset, args.eval_seqlen)
    except ValueError as error:
        raise ValueError(f"--eval-dataset {args.eval_dataset}: {error} (--eval-seqlen)") from error
    windows = every if limit == "all" else every[:limit]
    rest = "" if len(windows) == len(every) else "; --eval-windows all scores every one"
    print(f"{label}: perplexity on {len(windows)} of the {len(every)} {args.eval_seqlen}-token windows of "
          f"{args.eval_dataset}{rest}", flush=True)
    return windows


def _quantize(model, calibration_ids: torch.Tensor | None, args, device) -> None:
    method = get_method(args.method)
    calibration = _calibration(args)
    settings = QuantizeSettings(group_size=args.group_size, smoothing_samples=calibration["smooth_samples"],
                                smoothquant_alpha=args.alpha,
                                gptq=GPTQConfig(act_order=not args.no_act_order, **clip_searches(args)))
    start = time.time()
    quantize_model(model, method, calibration_ids, settings, device)
    used = f"calibration {args.calib_dataset} {calibration}" if calibration_ids is not None else "no calibration"
    print(f"quantized with {method.name} ({method.description}), group size {args.group_size}, {used}, "
          f"in {time.time() - start:.0f} s", flush=True)


def _perplexity(model, windows: torch.Tensor, args, device, label: str) -> float:
    from qqq.evaluate import perplexity

    value = perplexity(model.to(device), windows, device, desc=f"perplexity {label}", estimate=True)
    protocol = evaluation_protocol(args.eval_dataset, args.eval_seqlen)
    print(f"{label}: perplexity {value:.3f} on {args.eval_dataset} ({protocol}; {windows.shape[0]} windows scored)",
          flush=True)
    return value


def _note_if_embedded(name: str) -> None:
    note = embedded_note(name)
    if note:
        print(f"model: {note}", flush=True)


def _device(args) -> torch.device:
    if not args.device:
        return default_device()
    device = torch.device(args.device)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {args.device}: this machine has no CUDA GPU (use --device cpu)")
        if (device.index or 0) >= count:
            raise ValueError(f"--device {args.device}: this machine has {count} CUDA GPU(s), cuda:0 to "
                             f"cuda:{count - 1}")
    return device


def cmd_quantize(args) -> None:
    from qqq.checkpoint import check_output_folder, save_quantized

    method = get_method(args.method)  # fail on a bad name before loading anything
    if args.out and not method.packs_w4a8:
        sys.exit(f"qqq: error: --out saves W4A8 checkpoints; {method.name!r} has no packed format "
                 "(evaluate it with --eval)")
    if not args.out and not args.eval:
        sys.exit("qqq: error: the quantized model would be thrown away: add --eval (print FP and quantized "
                 "perplexity) and/or --out FOLDER (save the W4A8 checkpoint)")
    ignored = [f"--{field.replace('_', '-')}" for field, on in clip_searches(args).items() if on]
    ignored += ["--no-act-order"] if args.no_act_order else []
    if ignored and method.rounding != "gptq":
        print(f"qqq: note: {' '.join(ignored)} ignored: {method.name} does not run GPTQ", file=sys.stderr)
    if args.out:
        args.out = check_output_folder(args.out, args.force, source=args.model)
    device = _device(args)
    _calibration(args)  # its flags' consistency, before anything loads
    config = model_config(args.model)
    family_for_type(config.get("model_type"))  # an unsupported architecture fails before anything loads
    if method.weight_bits == 4:
        _check_group_size(config, args.group_size, args.model, method.packs_w4a8)
    tokenizer = load_tokenizer(args.model)
    vocab_size = config.get("vocab_size")
    _check_tokenizer_fits(vocab_size, tokenizer)
    calibration_ids = _calibration_ids(tokenizer, args, vocab_size) if method.calibrates else None
    windows = _evaluation_windows(tokenizer, args, device, vocab_size, args.model) if args.eval else None
    model, tokenizer = load_model(args.model, DTYPES.get(args.dtype), compute_device=device)
    _note_if_embedded(args.model)
    if args.eval:
        _perplexity(model, windows, args, device, "FP")
        model.to("cpu")
    _quantize(model, calibration_ids, args, device)
    if args.eval:
        _perplexity(model, windows, args, device, args.method)
    if args.out:
        saved = save_quantized(model.to("cpu"), args.out, tokenizer, {"method": method.name}, overwrite=args.force,
                               dtype=source_dtype(args.model))
        print(f"saved to {saved}")


def _describe_checkpoint(config: dict) -> str | None:
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") != "qqq":
        return None
    group_size = quantization.get("group_size")
    groups = "per-channel (group size -1)" if group_size == -1 else f"group size {group_size}"
    return f"QQQ checkpoint: W4A8 made with {quantization.get('method', 'an unrecorded method')}, {groups}"


def cmd_ppl(args) -> None:
    device = _device(args)
    config = model_config(args.model)
    windows = _evaluation_windows(load_tokenizer(args.model), args, device, config.get("vocab_size"), args.model)
    model, _ = load_model(args.model, DTYPES.get(args.dtype), compute_device=device)
    _note_if_embedded(args.model)
    if _describe_checkpoint(config):
        print(f"{args.model}: {_describe_checkpoint(config)}", flush=True)
    _perplexity(model, windows, args, device, args.model)


def cmd_zeroshot(args) -> None:
    from qqq.zeroshot import data_source, zero_shot

    device = _device(args)
    # a missing folder or tokenizer, or one that does not belong to the model, fails here, before the weights load
    _check_tokenizer_fits(model_config(args.model).get("vocab_size"), load_tokenizer(args.model))
    model, tokenizer = load_model(args.model, DTYPES.get(args.dtype), compute_device=device)
    _note_if_embedded(args.model)
    rows = zero_shot(model, tokenizer, args.tasks, limit=args.limit, offline=not args.online,
                     max_length=args.max_length, batch_size=args.batch_size, device=device)
    docs = f"the first {args.limit} docs of each task" if args.limit else "all docs"
    print(f"{args.model}: zero-shot (lm-eval, 0-shot), {docs}", flush=True)
    for row in rows:
        print(f"{row['task']} {row['metric']} {row['value']:.4f} +- {row['stderr']:.4f} ({row['docs']} docs, "
              f"{row['split']}; {data_source(row['task'], not args.online)})", flush=True)


def cmd_demo(args) -> None:
    args.model, args.out, args.force, args.eval = EMBEDDED_MODEL, None, False, True
    cmd_quantize(args)


def cmd_generate(args) -> None:
    import os

    from contextlib import nullcontext

    from qqq.fast.attention import kv_cache_fake_quantized
    from qqq.fast.backend import use_triton
    from qqq.fast.generation import Generator
    from qqq.fast.model import FastLlama

    if args.method in RENAMED_FAST_METHODS:
        print(f"qqq: note: --method {args.method} is now called {RENAMED_FAST_METHODS[args.method]} (round-to-nearest "
              "W4A8; the pipeline's qqq, smoothing + GPTQ, is what a QQQ checkpoint holds)", file=sys.stderr)
        args.method = RENAMED_FAST_METHODS[args.method]
    device = _device(args)
    config = model_config(args.model)
    family_for_type(config.get("model_type"))
    tokenizer = load_tokenizer(args.model)
    # every id it can give is a row of the model's embedding, not only the ids of this prompt
    _check_tokenizer_fits(config.get("vocab_size"), tokenizer)
    prompt = tokenizer(args.prompt, return_tensors="pt").input_ids
    if prompt.numel() == 0:
        sys.exit("qqq: error: --prompt gives no tokens; give some text")
    positions = config.get("max_position_embeddings")
    if positions and prompt.shape[1] + args.max_new_tokens > positions:
        raise ValueError(f"the prompt's {prompt.shape[1]} tokens and --max-new-tokens {args.max_new_tokens} exceed "
                         f"the {positions} positions of {args.model} (max_position_embeddings)")
    checkpoint = is_qqq_checkpoint(args.model)
    if checkpoint and args.method != "fp16":
        print(f"qqq: note: --method {args.method} is ignored: a QQQ checkpoint runs its own W4A8 weights",
              file=sys.stderr)
    if args.kv_smooth is not None and args.kv_bits != 8:
        print("qqq: note: --kv-smooth is ignored without --kv-bits 8 (it scales keys before they are rounded to "
              "int8)", file=sys.stderr)
    model, tokenizer = load_model(args.model, DTYPES.get(args.dtype), device=device)
    _note_if_embedded(args.model)
    kv_smooth = (DEFAULT_ALPHA if args.kv_smooth is None else args.kv_smooth) if args.kv_bits == 8 else 0.0
    if kv_smooth:
        smooth_attention_calibrated(model, tokenizer, kv_smooth)
    prompt = prompt.to(device)
    capacity = prompt.shape[1] + args.max_new_tokens
    fast = FastLlama.from_hf(model, "fp16" if checkpoint else args.method, max_positions=capacity,
                             kv_bits=args.kv_bits)
    runner = Generator(fast, 1, capacity, use_graph=False if args.no_graph else None)
    result = runner.generate(prompt, args.max_new_tokens)
    tokens = result.tokens[0].tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    print(args.prompt + tokenizer.decode(tokens, skip_special_tokens=True))
    backend = "Triton kernels" if use_triton(prompt) else "PyTorch reference ops"
    weights = ("qqq checkpoint, W4A8" if checkpoint else "unquantized" if args.method == "fp16" else args.method)
    cache = f"{args.kv_bits}-bit KV cache" + (f" (keys smoothed, alpha {kv_smooth})" if kv_smooth else "")
    print(f"\n[{weights}, {str(fast.dtype).removeprefix('torch.')} model, {cache}, {backend}"
          f"{', CUDA graphs' if runner.use_graph else ''}; {fast.weight_bytes() / 1e9:.2f} GB of weights] time to "
          f"first token {1e3 * result.ttft_s:.1f} ms, decode {result.decode_tokens_per_s:.1f} tokens/s "
          f"({args.max_new_tokens} tokens, greedy, {device})", flush=True)
    if args.check:
        previous = os.environ.get("QQQ_BACKEND")
        os.environ["QQQ_BACKEND"] = "reference"
        try:
            with torch.no_grad(), kv_cache_fake_quantized(model) if args.kv_bits == 8 else nullcontext():
                reference = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                           max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                           pad_token_id=tokenizer.pad_token_id)[0, prompt.shape[1]:]
            ours = result.tokens[0].tolist()
            same = next((i for i, (a, b) in enumerate(zip(ours, reference.tolist())) if a != b), args.max_new_tokens)
            rounded = (", keys, values and queries rounded as the 8-bit cache's attention takes them"
                       if args.kv_bits == 8 else "")
            print(f"check: the first {same} of {args.max_new_tokens} greedy tokens equal the Hugging Face model's "
                  f"(PyTorch reference ops{rounded})", flush=True)
            if same < args.max_new_tokens:  # how close was the reference's own choice at the first difference?
                with torch.no_grad(), kv_cache_fake_quantized(model) if args.kv_bits == 8 else nullcontext():
                    logits = model(torch.cat((prompt[0], reference[:same]))[None]).logits[0, -1].float()
                probabilities = logits.softmax(-1)
                print(f"  at token {same + 1} the reference model gives its choice {tokenizer.decode([reference[same]])!r} "
                      f"p={probabilities[reference[same]]:.3f} and the fast path's {tokenizer.decode([ours[same]])!r} "
                      f"p={probabilities[ours[same]]:.3f} (see experiments/fast_path_agreement.py for how far fp16 "
                      "rounding moves W4A8 outputs on either path)", flush=True)
        finally:
            os.environ.pop("QQQ_BACKEND") if previous is None else os.environ.update(QQQ_BACKEND=previous)


def linear_shapes(config: dict) -> list[tuple[int, int]]:
    """(N, K) of every decoder linear of the model of ``config`` (its config.json as a dict) and of the fused
    q/k/v and gate/up linears that ``qqq.fast`` runs."""
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    shapes = [(heads * head_dim, hidden), (kv_heads * head_dim, hidden), (hidden, heads * head_dim),
              (intermediate, hidden), (hidden, intermediate),
              ((heads + 2 * kv_heads) * head_dim, hidden), (2 * intermediate, hidden)]
    return list(dict.fromkeys(shapes))


def linear_shape(text: str) -> tuple[int, int]:
    try:
        n, k = (positive_int(v) for v in text.lower().split("x"))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected N x K like 8192x21760, got {text!r}") from None
    return n, k


def cmd_tune(args) -> None:
    from qqq.kernels_triton.autotune import Shape, tune
    from qqq.kernels_triton.config_table import QUICK_TUNE_NEW_PATHS

    if not torch.cuda.is_available():
        sys.exit("qqq: error: tuning times the kernels on a CUDA GPU; none is available")
    shapes = list(args.shape)
    gate_up = None
    if args.model:
        config = model_config(args.model)
        shapes += linear_shapes(config)
        gate_up = (2 * config["intermediate_size"], config["hidden_size"])  # timed with its SiLU*up epilogue
    if not shapes:
        sys.exit("qqq: error: give a MODEL or at least one --shape NxK")
    tune([Shape(n, k, g, silu_mul=(n, k) == gate_up) for n, k in shapes for g in args.group_size],
         shipped_only=args.quick, new_paths=QUICK_TUNE_NEW_PATHS if args.quick else ())


def cmd_export(args) -> None:
    from qqq.export import export_compressed_tensors

    start = time.time()
    out = export_compressed_tensors(args.checkpoint, args.out, force=args.force, max_shard_size=args.max_shard_size)
    print(f"exported {args.checkpoint} to {out} ({args.format}, W4A8 pack-quantized) in {time.time() - start:.0f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qqq", description="W4A8 quantization of LLMs (QQQ) with Triton kernels",
                                     formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    quantize = commands.add_parser("quantize", help="quantize a model (and optionally save and evaluate it)",
                                   formatter_class=HelpFormatter)
    quantize.add_argument("model", nargs="?", default=EMBEDDED_MODEL,
                          help=f"Hugging Face id or local folder (default: {EMBEDDED_MODEL!r}, the embedded model)")
    quantize.add_argument("--out", help="save the W4A8 checkpoint in this (new or empty) folder")
    quantize.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    quantize.add_argument("--eval", action="store_true", help="print FP and quantized perplexity")
    _add_quantize_arguments(quantize)
    _add_eval_arguments(quantize, default_windows=None)
    _add_model_arguments(quantize)
    quantize.set_defaults(run=cmd_quantize)

    evaluate = commands.add_parser("eval", help="evaluate a model or QQQ checkpoint", formatter_class=HelpFormatter)
    evaluations = evaluate.add_subparsers(dest="evaluation", required=True)
    ppl = evaluations.add_parser("ppl", help="perplexity of a model or QQQ checkpoint", formatter_class=HelpFormatter)
    model_help = "Hugging Face id, local folder, QQQ checkpoint, or an embedded model: " + ", ".join(EMBEDDED_MODELS)
    ppl.add_argument("model", help=model_help)
    _add_eval_arguments(ppl, default_windows=None)
    _add_model_arguments(ppl)
    ppl.set_defaults(run=cmd_ppl)
    zeroshot = evaluations.add_parser("zeroshot", help="zero-shot accuracy (lm-evaluation-harness, offline copies)",
                                      formatter_class=HelpFormatter)
    zeroshot.add_argument("model", help=model_help)
    zeroshot.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS + EXTRA_TASKS, help="lm-eval tasks")
    zeroshot.add_argument("--limit", type=positive_int, help="score only the first N docs of each task (default: all)")
    zeroshot.add_argument("--max-length", type=positive_int, default=2048, help="HFLM max_length (set explicitly)")
    zeroshot.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass")
    zeroshot.add_argument("--online", action="store_true", help="lm-eval's own tasks, data from the Hugging Face hub")
    _add_model_arguments(zeroshot)
    zeroshot.set_defaults(run=cmd_zeroshot)

    demo = commands.add_parser("demo", help="quantize the embedded model with QQQ and print FP and W4A8 perplexity",
                               formatter_class=HelpFormatter)
    _add_quantize_arguments(demo, group_size=64, smooth_samples=1)  # 128 does not divide its 576 channels
    _add_eval_arguments(demo, default_windows=4)
    _add_model_arguments(demo)
    demo.set_defaults(run=cmd_demo)

    generate = commands.add_parser("generate", help="greedy generation with the fast inference path, tokens/s",
                                   formatter_class=HelpFormatter)
    generate.add_argument("model", nargs="?", default=EMBEDDED_MODEL,
                          help=f"Hugging Face id, local folder, QQQ checkpoint (default: {EMBEDDED_MODEL!r})")
    generate.add_argument("--prompt", default="The capital of France is", help="text to continue")
    generate.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate")
    generate.add_argument("--method", default="fp16", choices=FAST_METHODS + tuple(RENAMED_FAST_METHODS),
                          metavar="{" + ",".join(FAST_METHODS) + "}",
                          help="format for a model that is not a QQQ checkpoint (the quantized ones round to nearest; "
                          "a QQQ checkpoint keeps its own smoothed + GPTQ weights)")
    generate.add_argument("--kv-bits", type=int, default=16, choices=KV_BITS,
                          help="KV cache: 16 (the model's dtype) or 8 (int8, per-token and per-head scales)")
    generate.add_argument("--kv-smooth", type=unit_fraction, default=None, metavar="ALPHA",
                          help="with --kv-bits 8: SmoothAttention's per-channel key scales (max ** ALPHA) folded into "
                          f"q_proj / k_proj, calibrated on {CALIBRATION_TEXT} (exact in floating point; it tames "
                          f"the keys' outlier channels before they are rounded to int8; default {DEFAULT_ALPHA}, 0: "
                          "none)")
    generate.add_argument("--no-graph", action="store_true", help="decode without CUDA graphs")
    generate.add_argument("--check", action="store_true",
                          help="compare the greedy tokens with the Hugging Face model's (PyTorch reference ops)")
    _add_model_arguments(generate, device_use="generation")
    generate.set_defaults(run=cmd_generate)

    export = commands.add_parser("export", help="write a QQQ checkpoint in a format other engines serve (vLLM)",
                                 formatter_class=HelpFormatter)
    export.add_argument("checkpoint", help="a QQQ checkpoint folder (qqq quantize ... --out)")
    export.add_argument("--format", default="compressed-tensors", choices=EXPORT_FORMATS)
    export.add_argument("--out", required=True, help="the folder to write (refused if it exists and is not empty)")
    export.add_argument("--force", action="store_true", help="replace a non-empty --out")
    export.add_argument("--max-shard-size", type=shard_size, default=DEFAULT_MAX_SHARD_SIZE,
                        help="safetensors shard size, e.g. 5GB")
    export.set_defaults(run=cmd_export)

    tune = commands.add_parser("tune", help="autotune the W4A8 kernels for this GPU and store the configs",
                               formatter_class=HelpFormatter)
    tune.add_argument("model", nargs="?", help="tune every linear shape of this model (id or local folder)")
    tune.add_argument("--shape", action="append", default=[], type=linear_shape,
                      help="an extra N x K shape, e.g. 8192x21760 (repeat for more)")
    tune.add_argument("--group-size", type=int, nargs="+", default=[-1, 128], choices=SUPPORTED_GROUP_SIZES,
                      help="group sizes to tune, -1 = per-channel")
    tune.add_argument("--quick", action="store_true",
                      help="time only the configs shipped for a GPU of the same chip (this and the neighbouring M "
                           "buckets; every candidate where none is shipped), plus every candidate of a kernel path "
                           "newer than the shipped files (split-K in the fused Gluon kernel): a handful a problem, "
                           "not about 80")
    tune.set_defaults(run=cmd_tune)
    return parser


def _terminated(signum, frame) -> None:
    """SIGTERM (``kill``, a job scheduler) as an exit, so that a half-written output's clean-up runs as on Ctrl-C."""
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()  # where Python takes signal handlers
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, NotImplementedError, RuntimeError, OSError) as error:
        sys.exit(f"qqq: error: {error}")
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()

"""The ``qqq`` command line: quantize, eval (ppl, zeroshot), demo, generate, tune."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from qqq.data import calibration_windows, dataset_names, evaluation_protocol, load_text, perplexity_windows, tokenize
from qqq.gptq import GPTQConfig
from qqq.inference import METHODS as FAST_METHODS
from qqq.models import EMBEDDED_MODEL, EMBEDDED_MODELS, embedded_note, load_model
from qqq.numerics import SUPPORTED_GROUP_SIZES
from qqq.pipeline import (DEMO_CALIBRATION, METHOD_ALIASES, METHODS, QuantizeSettings, calibration_settings,
                          default_device, get_method, quantize_model)
from qqq.zeroshot import EXTRA_TASKS, TASKS

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="model dtype (default: float16 on CUDA, float32 on the CPU)")
    parser.add_argument("--device", default=None, help="device for calibration and evaluation (default: cuda if any)")


def _add_eval_arguments(parser: argparse.ArgumentParser, default_windows: int | None) -> None:
    parser.add_argument("--eval-dataset", default="exllamav2-wiki",
                        help=f"perplexity text: one of {dataset_names()} or a .txt/.jsonl file")
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=default_windows,
                        help="score only the first N windows (default: all)" if default_windows is None
                        else f"score only the first N windows (default: {default_windows})")


def _add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="qqq",
                        help=f"one of {sorted(METHODS)} (aliases: {', '.join(METHOD_ALIASES)})")
    parser.add_argument("--group-size", type=int, default=-1, choices=SUPPORTED_GROUP_SIZES,
                        help="-1 = per-channel")
    parser.add_argument("--calib-dataset", default="exllamav2-c4",
                        help=f"calibration text: one of {dataset_names()} or a .txt/.jsonl file")
    parser.add_argument("--paper-settings", action="store_true",
                        help="the paper's calibration: 128 x 2048-token windows, 8 sequences for smoothing")
    parser.add_argument("--nsamples", type=int, help=f"calibration windows (default {DEMO_CALIBRATION['nsamples']})")
    parser.add_argument("--seqlen", type=int, help=f"calibration window length (default {DEMO_CALIBRATION['seqlen']})")
    parser.add_argument("--smooth-samples", type=int,
                        help=f"windows used by the smoothing search (default {DEMO_CALIBRATION['smooth_samples']})")
    parser.add_argument("--mse-clip", action="store_true", help="GPTQ: search a clipping factor per channel/group")
    parser.add_argument("--no-act-order", action="store_true", help="GPTQ: quantize columns in natural order")
    parser.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    parser.add_argument("--seed", type=int, default=0)


def _calibration(args) -> dict:
    return calibration_settings(args.paper_settings, nsamples=args.nsamples, seqlen=args.seqlen,
                                smooth_samples=args.smooth_samples)


def _quantize(model, tokenizer, args, device) -> dict:
    method = get_method(args.method)
    calibration = _calibration(args)
    ids = None
    if method.smoothing or method.rounding == "gptq":
        text = load_text(args.calib_dataset, split="train")
        ids = calibration_windows(tokenize(tokenizer, text), calibration["nsamples"], calibration["seqlen"], args.seed)
    settings = QuantizeSettings(group_size=args.group_size, smoothing_samples=calibration["smooth_samples"],
                                smoothquant_alpha=args.alpha,
                                gptq=GPTQConfig(act_order=not args.no_act_order, mse_clip=args.mse_clip))
    start = time.time()
    quantize_model(model, method, ids, settings, device)
    print(f"quantized with {method.name} ({method.description}), group size {args.group_size}, "
          f"calibration {args.calib_dataset} {calibration}, in {time.time() - start:.0f} s", flush=True)
    return calibration


def _perplexity(model, tokenizer, args, device, label: str) -> float:
    from qqq.evaluate import perplexity

    windows = perplexity_windows(tokenize(tokenizer, load_text(args.eval_dataset, split="test")),
                                 args.eval_dataset, args.eval_seqlen, args.eval_windows)
    value = perplexity(model.to(device), windows, device, desc=f"perplexity {label}")
    protocol = evaluation_protocol(args.eval_dataset, args.eval_seqlen)
    print(f"{label}: perplexity {value:.3f} on {args.eval_dataset} ({protocol}; {windows.shape[0]} windows scored)",
          flush=True)
    return value


def _note_if_embedded(name: str) -> None:
    note = embedded_note(name)
    if note:
        print(f"model: {note}", flush=True)


def cmd_quantize(args) -> None:
    from qqq.checkpoint import save_quantized

    method = get_method(args.method)  # fail on a bad name before loading anything
    if args.out and not method.packs_w4a8:
        sys.exit(f"qqq: error: --out saves W4A8 checkpoints; {method.name!r} has no packed format "
                 "(evaluate it with --eval)")
    device = torch.device(args.device) if args.device else default_device()
    model, tokenizer = load_model(args.model, DTYPES.get(args.dtype))
    _note_if_embedded(args.model)
    if args.eval:
        _perplexity(model, tokenizer, args, device, "FP")
        model.to("cpu")
    _quantize(model, tokenizer, args, device)
    if args.eval:
        _perplexity(model, tokenizer, args, device, args.method)
    if args.out:
        print(f"saved to {save_quantized(model.to('cpu'), args.out, tokenizer, {'method': method.name})}")


def cmd_ppl(args) -> None:
    device = torch.device(args.device) if args.device else default_device()
    model, tokenizer = load_model(args.model, DTYPES.get(args.dtype))
    _note_if_embedded(args.model)
    _perplexity(model, tokenizer, args, device, args.model)


def cmd_zeroshot(args) -> None:
    from qqq.zeroshot import data_source, zero_shot

    device = torch.device(args.device) if args.device else default_device()
    model, tokenizer = load_model(args.model, DTYPES.get(args.dtype))
    _note_if_embedded(args.model)
    rows = zero_shot(model, tokenizer, args.tasks, limit=args.limit, offline=not args.online,
                     max_length=args.max_length, batch_size=args.batch_size, device=device)
    docs = f"the first {args.limit} docs of each task" if args.limit else "all docs"
    print(f"{args.model}: zero-shot (lm-eval, 0-shot), {docs}", flush=True)
    for row in rows:
        print(f"{row['task']} {row['metric']} {row['value']:.4f} +- {row['stderr']:.4f} ({row['docs']} docs, "
              f"{row['split']}; {data_source(row['task'], not args.online)})", flush=True)


def cmd_demo(args) -> None:
    args.model, args.out, args.eval = EMBEDDED_MODEL, None, True
    cmd_quantize(args)


def cmd_generate(args) -> None:
    import os

    from qqq.inference import FastLlama, Generator
    from qqq.linear import triton_available_for
    from qqq.models import is_qqq_checkpoint

    device = torch.device(args.device) if args.device else default_device()
    model, tokenizer = load_model(args.model, DTYPES.get(args.dtype), device=device)
    _note_if_embedded(args.model)
    method = "qqq checkpoint" if is_qqq_checkpoint(args.model) else args.method
    prompt = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    capacity = prompt.shape[1] + args.max_new_tokens
    fast = FastLlama.from_hf(model, "fp16" if method == "qqq checkpoint" else method, max_positions=capacity)
    runner = Generator(fast, 1, capacity, use_graph=False if args.no_graph else None)
    result = runner.generate(prompt, args.max_new_tokens)
    tokens = result.tokens[0].tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    print(args.prompt + tokenizer.decode(tokens, skip_special_tokens=True))
    backend = "Triton kernels" if triton_available_for(prompt) else "PyTorch reference ops"
    print(f"\n[{method}, {backend}{', CUDA graphs' if runner.use_graph else ''}; {fast.weight_bytes() / 1e9:.2f} GB "
          f"of weights] time to first token {1e3 * result.ttft_s:.1f} ms, decode "
          f"{result.decode_tokens_per_s:.1f} tokens/s ({args.max_new_tokens} tokens, greedy, {device})", flush=True)
    if args.check:
        previous = os.environ.get("QQQ_BACKEND")
        os.environ["QQQ_BACKEND"] = "reference"
        try:
            with torch.no_grad():
                reference = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                           max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                           pad_token_id=tokenizer.pad_token_id)[0, prompt.shape[1]:]
            ours = result.tokens[0].tolist()
            same = next((i for i, (a, b) in enumerate(zip(ours, reference.tolist())) if a != b), args.max_new_tokens)
            print(f"check: the first {same} of {args.max_new_tokens} greedy tokens equal the Hugging Face model's "
                  "(PyTorch reference ops)", flush=True)
            if same < args.max_new_tokens:  # how close was the reference's own choice at the first difference?
                with torch.no_grad():
                    logits = model(torch.cat((prompt[0], reference[:same]))[None]).logits[0, -1].float()
                probabilities = logits.softmax(-1)
                print(f"  at token {same + 1} the reference model gives its choice {tokenizer.decode([reference[same]])!r} "
                      f"p={probabilities[reference[same]]:.3f} and the fast path's {tokenizer.decode([ours[same]])!r} "
                      f"p={probabilities[ours[same]]:.3f} (see experiments/fast_path_agreement.py for how far fp16 "
                      "rounding moves W4A8 outputs on either path)", flush=True)
        finally:
            os.environ.pop("QQQ_BACKEND") if previous is None else os.environ.update(QQQ_BACKEND=previous)


def linear_shapes(model_name: str) -> list[tuple[int, int]]:
    """(N, K) of every decoder linear of ``model_name`` and of the fused q/k/v and gate/up linears that
    ``qqq.inference`` runs, read from its config alone."""
    from transformers import AutoConfig

    from qqq.models import model_path

    config = AutoConfig.from_pretrained(model_path(model_name))
    hidden, intermediate = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    shapes = [(heads * head_dim, hidden), (kv_heads * head_dim, hidden), (hidden, heads * head_dim),
              (intermediate, hidden), (hidden, intermediate),
              ((heads + 2 * kv_heads) * head_dim, hidden), (2 * intermediate, hidden)]
    return list(dict.fromkeys(shapes))


def cmd_tune(args) -> None:
    from qqq.kernels_triton.tuning import tune

    if not torch.cuda.is_available():
        sys.exit("qqq: error: tuning times the kernels on a CUDA GPU; none is available")
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shape]
    if args.model:
        shapes += linear_shapes(args.model)
    if not shapes:
        sys.exit("qqq: error: give a MODEL or at least one --shape NxK")
    tune([(n, k, g) for n, k in shapes for g in args.group_size])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qqq", description="W4A8 quantization of LLMs (QQQ) with Triton kernels")
    commands = parser.add_subparsers(dest="command", required=True)

    quantize = commands.add_parser("quantize", help="quantize a model (and optionally save and evaluate it)")
    quantize.add_argument("model", nargs="?", default=EMBEDDED_MODEL,
                          help=f"Hugging Face id or local folder (default: {EMBEDDED_MODEL!r}, the embedded model)")
    quantize.add_argument("--out", help="save the W4A8 checkpoint here")
    quantize.add_argument("--eval", action="store_true", help="print FP and quantized perplexity")
    _add_quantize_arguments(quantize)
    _add_eval_arguments(quantize, default_windows=None)
    _add_model_arguments(quantize)
    quantize.set_defaults(run=cmd_quantize)

    evaluate = commands.add_parser("eval", help="evaluate a model or QQQ checkpoint")
    evaluations = evaluate.add_subparsers(dest="evaluation", required=True)
    ppl = evaluations.add_parser("ppl", help="perplexity of a model or QQQ checkpoint")
    model_help = "Hugging Face id, local folder, QQQ checkpoint, or an embedded model: " + ", ".join(EMBEDDED_MODELS)
    ppl.add_argument("model", help=model_help)
    _add_eval_arguments(ppl, default_windows=None)
    _add_model_arguments(ppl)
    ppl.set_defaults(run=cmd_ppl)
    zeroshot = evaluations.add_parser("zeroshot", help="zero-shot accuracy (lm-evaluation-harness, offline copies)")
    zeroshot.add_argument("model", help=model_help)
    zeroshot.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS + EXTRA_TASKS)
    zeroshot.add_argument("--limit", type=int, help="score only the first N docs of each task (default: all)")
    zeroshot.add_argument("--max-length", type=int, default=2048, help="HFLM max_length (set explicitly)")
    zeroshot.add_argument("--batch-size", type=int, default=8)
    zeroshot.add_argument("--online", action="store_true", help="lm-eval's own tasks, data from the Hugging Face hub")
    _add_model_arguments(zeroshot)
    zeroshot.set_defaults(run=cmd_zeroshot)

    demo = commands.add_parser("demo", help="quantize the embedded model with QQQ and print FP and W4A8 perplexity")
    _add_quantize_arguments(demo)
    _add_eval_arguments(demo, default_windows=4)
    _add_model_arguments(demo)
    demo.set_defaults(run=cmd_demo, group_size=64, smooth_samples=1)  # 128 does not divide its 576 channels

    generate = commands.add_parser("generate", help="greedy generation with the fast inference path, tokens/s")
    generate.add_argument("model", nargs="?", default=EMBEDDED_MODEL,
                          help=f"Hugging Face id, local folder, QQQ checkpoint (default: {EMBEDDED_MODEL!r})")
    generate.add_argument("--prompt", default="The capital of France is")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--method", default="fp16", choices=FAST_METHODS,
                          help="format for a model that is not a QQQ checkpoint (quantized ones round to nearest)")
    generate.add_argument("--no-graph", action="store_true", help="decode without CUDA graphs")
    generate.add_argument("--check", action="store_true",
                          help="compare the greedy tokens with the Hugging Face model's (PyTorch reference ops)")
    _add_model_arguments(generate)
    generate.set_defaults(run=cmd_generate)

    tune = commands.add_parser("tune", help="autotune the W4A8 kernels for this GPU and store the configs")
    tune.add_argument("model", nargs="?", help="tune every linear shape of this model (id or local folder)")
    tune.add_argument("--shape", action="append", default=[], help="an extra N x K shape, e.g. 8192x21760")
    tune.add_argument("--group-size", type=int, nargs="+", default=[-1, 128], choices=SUPPORTED_GROUP_SIZES)
    tune.set_defaults(run=cmd_tune)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, NotImplementedError, RuntimeError, OSError) as error:
        sys.exit(f"qqq: error: {error}")


if __name__ == "__main__":
    main()

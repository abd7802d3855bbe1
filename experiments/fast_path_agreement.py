"""How closely the fast inference path (``qqq.fast.model.FastLlama``) follows the Hugging Face model on the same
W4A8 weights, in fp32 and in fp16, on the embedded model.

Both run the PyTorch reference ops (no kernels: the kernels have their own exactness tests), so what differs is
only the order and precision of the float ops around the quantized GEMMs (RoPE in fp32 with one rounding here,
fp16 roundings between HF's ops). Every prefix of a short text is scored by both; the script reports the mean
total-variation distance between their next-token distributions and how often their argmax agrees, each
against the fp32 Hugging Face model. Writes ``<out>/fast_path_agreement.md``.

    python experiments/fast_path_agreement.py --out results
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["QQQ_BACKEND"] = "reference"

from qqq.fast.model import FastLlama  # noqa: E402
from qqq.models import EMBEDDED_MODEL, EMBEDDED_NOTE, load_model  # noqa: E402
from qqq.pipeline import QuantizeSettings, quantize_model  # noqa: E402
from qqq.provenance import atomic_write, markdown_provenance, provenance  # noqa: E402

TEXT = ("The capital of France is Paris, where you can find the Eiffel Tower. The city is known for its museums, "
        "its food and its long history as a centre of art and science in Europe.")


def next_token_distributions(model, ids: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token probabilities after every ``step``-th prefix: (Hugging Face, FastLlama)."""
    fast = FastLlama.from_hf(model, max_positions=ids.shape[1] + 1)
    with torch.no_grad():
        hf = model(ids).logits[0].float().softmax(-1)
    lengths = range(step, ids.shape[1] + 1, step)
    ours = [fast(ids[:, :t], torch.arange(t)[None], fast.new_cache(1, t))[0].float()
            .softmax(-1) for t in lengths]
    return hf[[t - 1 for t in lengths]], torch.stack(ours)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--step", type=int, default=4, help="score every STEP-th prefix")
    args = parser.parse_args()
    meta = provenance()
    model, tokenizer = load_model(EMBEDDED_MODEL, torch.float32)
    quantize_model(model, "w4a8_rtn", None, QuantizeSettings(group_size=args.group_size))
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    reference = None
    rows = []
    for dtype in (torch.float32, torch.float16):
        model = model.to(dtype)
        hf, fast = next_token_distributions(model, ids, args.step)
        if reference is None:
            reference = hf
        for name, probabilities in ((f"Hugging Face, {dtype}", hf), (f"FastLlama, {dtype}", fast)):
            tv = 0.5 * (probabilities - reference).abs().sum(-1)
            agree = (probabilities.argmax(-1) == reference.argmax(-1)).float()
            rows.append((name, float(tv.mean()), float(agree.mean())))
    lines = ["# The fast path against the Hugging Face model (same W4A8 weights, PyTorch reference ops)", "",
             f"{EMBEDDED_NOTE}, quantized w4a8_rtn g{args.group_size}; next-token distributions after "
             f"{reference.shape[0]} prefixes of a {ids.shape[1]}-token text, compared with the Hugging Face model "
             "in fp32.", "", "| path | mean total variation | argmax agrees |", "|---|---|---|"]
    lines += [f"| {name} | {tv:.4f} | {agree:.0%} |" for name, tv, agree in rows]
    lines += ["", "## How it was made", "", markdown_provenance(meta), ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "fast_path_agreement.md") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

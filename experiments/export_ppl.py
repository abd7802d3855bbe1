"""What exporting a QQQ checkpoint to compressed-tensors changes: perplexity through both -> results/export_ppl.{csv,md}.

For each QQQ checkpoint (``qqq quantize ... --out DIR``) the script exports it (``qqq.export``) and scores:
- ``qqq``: the checkpoint itself (``QQQLinear``; per group, QQQ's two-level scale with the int8 rounding of
  ``code * ratio``);
- ``export, int8 /127``: the weights that compressed-tensors decompresses from the export, with QQQ's per-token int8
  activations (scale amax / 127, as vLLM's int8 kernels quantize);
- ``export via transformers``: the export as transformers loads it with compressed-tensors (its fake quantization,
  activation scale amax / 127.5).

Per channel the export holds exactly the checkpoint's weights, so its two rows show how far float summation order
alone moves a perplexity through int8 activation rounding. ``--append`` adds this run's rows to the table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from qqq.checkpoint import load_quantized
from qqq.data import evaluation_protocol, load_text, perplexity_windows, tokenize
from qqq.evaluate import perplexity
from qqq.export import export_compressed_tensors
from qqq.linear import FakeQuantLinear
from qqq.model_families import family_of
from qqq.models import load_tokenizer
from qqq.provenance import atomic_write, provenance, results_file, results_stem, script_results_table

KEY_COLUMNS = ["checkpoint", "path", "dataset", "seqlen", "windows"]


def qqq_checkpoint(text: str) -> str:
    """A folder ``qqq quantize --out`` wrote: its config.json's quantization_config is QQQ's."""
    config = Path(text) / "config.json"
    quant = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    if not quant or quant.get("quant_method") != "qqq":
        found = ("no config.json" if not config.is_file() else "no quantization_config in its config.json" if not quant
                 else f"quant_method {quant.get('quant_method')!r}")
        raise argparse.ArgumentTypeError(f"{text} is not a QQQ checkpoint (a folder `qqq quantize ... --out DIR` "
                                         "wrote: config.json with quantization_config.quant_method 'qqq'); "
                                         f"found {found}")
    return text


def parse_args():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoints", nargs="+", type=qqq_checkpoint, help="QQQ checkpoint folders")
    p.add_argument("--dataset", default="exllamav2-wiki")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=2, help="first N evaluation windows (0 = all)")
    p.add_argument("--append", action="store_true", help="keep the rows of --out.csv this run does not measure")
    p.add_argument("--out", default="results/export_ppl")
    return p.parse_args()


def loaded_by_transformers(export: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    with torch.no_grad():
        model(torch.zeros(1, 2, dtype=torch.long))  # compressed-tensors decompresses the weights on the first forward
    return model


def with_per_token_int8_inputs(model):
    """``model`` (loaded by transformers from a compressed-tensors folder) with every decoder linear replaced by
    its decompressed weight and QQQ's per-token int8 activation quantization."""
    family = family_of(model)
    for layer in family.decoder_layers(model):
        for name, linear in family.linears(layer).items():
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child,
                    FakeQuantLinear(linear.weight.detach(), linear.bias, quantize_input=True))
    return model


def main():
    import compressed_tensors

    args = parse_args()
    out = results_stem(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = provenance() | {"compressed-tensors": compressed_tensors.__version__}
    results = script_results_table(out, KEY_COLUMNS, meta, args.append)
    rows = []
    for checkpoint in args.checkpoints:
        quant = json.loads((Path(checkpoint) / "config.json").read_text())["quantization_config"]
        windows = perplexity_windows(tokenize(load_tokenizer(checkpoint), load_text(args.dataset, "test")),
                                     args.dataset, args.seqlen, args.windows or None)
        with tempfile.TemporaryDirectory() as folder:
            export = export_compressed_tensors(checkpoint, Path(folder) / "export")
            candidates = {
                "qqq": lambda: load_quantized(checkpoint, dtype=torch.float32),
                "export, int8 /127": lambda: with_per_token_int8_inputs(loaded_by_transformers(export)),
                "export via transformers": lambda: loaded_by_transformers(export),
            }
            for path, build in candidates.items():
                start = time.time()
                value = perplexity(build(), windows, "cpu", desc=f"{Path(checkpoint).name} {path}")
                rows.append(dict(checkpoint=str(checkpoint), method=quant.get("method", "?"),
                                 group_size=quant["group_size"], path=path, dataset=args.dataset, seqlen=args.seqlen,
                                 windows=windows.shape[0], ppl=round(value, 4), seconds=round(time.time() - start)))
                print(rows[-1], flush=True)
                table = results.write(rows)
                with atomic_write(results_file(out, ".md")) as f:
                    f.write("\n".join([
                        "# Perplexity through a QQQ checkpoint and its compressed-tensors export", "",
                        table.drop(columns="run").to_markdown(index=False), "",
                        f"- evaluation: {evaluation_protocol(args.dataset, args.seqlen)}; the first windows only (CPU)",
                        "- qqq: the checkpoint (QQQLinear); export, int8 /127: the decompressed export with QQQ's "
                        "per-token int8 activations (vLLM's int8 kernels' scale); export via transformers: "
                        "compressed-tensors' fake quantization (activation scale amax / 127.5)", "",
                        "## How it was made", "", results.markdown(table, configurations), ""]))


def configurations(rows: pd.DataFrame) -> str:
    return ", ".join(sorted(set(rows["checkpoint"])))


if __name__ == "__main__":
    main()

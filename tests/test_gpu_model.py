"""A real-sized model and the CLI on the GPU with their defaults (skipped without one).

A Llama-2-7B-shaped model (real hidden and intermediate sizes, two layers, random weights) runs a 2048-token
prefill and ``qqq.evaluate.perplexity`` with the kernels and must agree with ``QQQ_BACKEND=reference``; the
``qqq`` commands run with their default flags on a small config-built model, as a user on a GPU would.
"""

import json

import pytest
import torch
from conftest import compiled_kernels, tiny_model

from qqq.cli import main
from qqq.evaluate import perplexity
from qqq.linear import QQQLinear
from qqq.model_families import family_of

pytestmark = compiled_kernels


def llama2_7b_shaped(layers: int = 2):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()


def to_qqq_linears(model, group_size: int) -> None:
    family = family_of(model)
    for layer in family.decoder_layers(model):
        for name, linear in family.linears(layer).items():
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, QQQLinear.from_linear(linear, group_size))


@pytest.mark.parametrize("group_size", [-1, 128])
def test_llama2_7b_shaped_prefill_and_perplexity_agree_with_the_reference(group_size, monkeypatch):
    model = llama2_7b_shaped()
    to_qqq_linears(model, group_size)
    windows = torch.randint(0, 32000, (2, 2048), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(windows[:1].cuda(), use_cache=False).logits.float()
    kernels = perplexity(model, windows, "cuda")
    monkeypatch.setenv("QQQ_BACKEND", "reference")
    with torch.no_grad():
        expected_logits = model(windows[:1].cuda(), use_cache=False).logits.float()
    reference = perplexity(model, windows, "cuda")
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-2 * float(expected_logits.abs().max()))
    assert abs(kernels - reference) <= 1e-3 * reference, (kernels, reference)


@pytest.fixture(scope="module")
def fp16_model_dir(tmp_path_factory):
    """A small fp16 Llama with a word-level tokenizer of its own (the machine may have no model files at all)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from qqq.data import load_text

    words = sorted(set(load_text("exllamav2-wiki").split()))[:1000]
    vocab = {"<unk>": 0, "<eos>": 1} | {word: i + 2 for i, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                                        pad_token="<eos>")
    path = tmp_path_factory.mktemp("fp16-model")
    tiny_model("llama", hidden=256, intermediate=512, vocab=len(vocab)).half().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_quantize_eval_and_generate_with_default_flags(fp16_model_dir, tmp_path, capsys):
    checkpoint = tmp_path / "w4a8"
    main(["quantize", str(fp16_model_dir), "--out", str(checkpoint)])
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "qqq"
    from safetensors import safe_open

    with safe_open(checkpoint / "model.safetensors", "pt") as tensors:  # the checkpoint keeps its source's dtype
        assert tensors.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    main(["eval", "ppl", str(checkpoint)])
    printed = capsys.readouterr().out
    assert f"{checkpoint}: perplexity" in printed
    main(["generate", str(checkpoint)])
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "Triton kernels" in printed

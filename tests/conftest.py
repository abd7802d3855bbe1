import importlib.util
import os
import re
import sys
from pathlib import Path

import torch

# Without a GPU the Triton kernels run on the CPU through the interpreter (the CPU suite); with one they are
# compiled (the GPU suite, tests/test_gpu*.py). Triton reads this when a kernel is defined, so it is set before
# any qqq kernel module is imported; an explicit TRITON_INTERPRET wins.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
INTERPRETED = os.environ["TRITON_INTERPRET"] == "1"

import pytest  # noqa: E402

interpreted_kernels = pytest.mark.skipif(
    not INTERPRETED, reason="runs the kernels on CPU tensors under TRITON_INTERPRET=1 (the CPU suite)")
compiled_kernels = pytest.mark.skipif(
    INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA GPU with compiled kernels (TRITON_INTERPRET unset)")


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def experiment_module(name: str):
    """The script ``experiments/<name>.py`` imported as a module (its ``main`` not run), to test its helpers."""
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))  # the scripts import each other (attention_speed: gemm_speed)
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_stops_without_a_gpu(script, argv: list[str], message: str, out: Path, monkeypatch) -> None:
    """``script``'s main, run with ``argv`` on a machine without CUDA, exits with ``message`` alone and creates
    nothing at ``out``."""
    monkeypatch.setattr(script.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=f"^{re.escape(message)}$"):
        script.main()
    assert not out.exists()


def tiny_config(model_type: str = "llama", hidden: int = 256, intermediate: int = 512, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, vocab: int = 320):
    """A small decoder of the given family, built from a config (no download): GQA, RoPE, SwiGLU."""
    from transformers import LlamaConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[model_type]
    return config_class(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                        max_position_embeddings=256, tie_word_embeddings=False)


def tiny_model(model_type: str = "llama", seed: int = 0, **sizes):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **sizes), dtype=torch.float32).eval()
    with torch.no_grad():  # outlier channels, as real LLM activations have, so smoothing has work to do
        for layer in model.model.layers:
            layer.input_layernorm.weight.mul_(1 + 8 * (torch.rand_like(layer.input_layernorm.weight) > 0.95))
            if model_type == "qwen2":
                layer.self_attn.v_proj.bias.normal_(0, 0.5)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama with the embedded model's tokenizer, saved like any Hugging Face model folder (CLI tests)."""
    from qqq.models import EMBEDDED_MODEL, load_tokenizer

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", hidden=64, intermediate=128, vocab=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def reference_backend(monkeypatch):
    """Run QQQLinear through the PyTorch reference (model-level tests; the kernels have their own tests)."""
    monkeypatch.setenv("QQQ_BACKEND", "reference")


def token_batch(n: int = 4, seq_len: int = 32, vocab: int = 320, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=generator)

import re

import pytest
import torch

from qqq.cli import main
from qqq.models import EMBEDDED_MODEL, load_model, model_config


def perplexities(output: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\S+): perplexity ([\d.]+)", output, re.MULTILINE)}


def test_quantize_save_and_score_the_checkpoint(tiny_model_dir, tmp_path, capsys, reference_backend):
    out = tmp_path / "w4a8"
    eval_args = ["--eval-windows", "2", "--eval-seqlen", "64", "--device", "cpu"]
    main(["quantize", str(tiny_model_dir), "--method", "gptq", "--group-size", "32", "--nsamples", "4",
          "--seqlen", "64", "--out", str(out), "--eval", *eval_args])
    printed = perplexities(capsys.readouterr().out)
    assert set(printed) == {"FP", "gptq"} and all(v > 1 for v in printed.values())
    main(["eval", "ppl", str(out), *eval_args])
    assert perplexities(capsys.readouterr().out)[str(out)] == printed["gptq"]


def test_methods_without_a_packed_format_are_not_saved(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="no packed format"):
        main(["quantize", str(tiny_model_dir), "--method", "w4a16_rtn", "--out", str(tmp_path / "x"),
              "--device", "cpu"])


def test_bad_arguments_exit_with_a_message(tiny_model_dir):
    with pytest.raises(SystemExit, match="unknown method"):
        main(["quantize", str(tiny_model_dir), "--method", "awq", "--device", "cpu"])
    with pytest.raises(SystemExit, match="unknown dataset"):
        main(["eval", "ppl", str(tiny_model_dir), "--eval-dataset", "nope", "--device", "cpu"])


def test_embedded_model_loads_as_llama_with_chat_eos():
    model, tokenizer = load_model(EMBEDDED_MODEL)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0] != tokenizer.bos_token_id  # no BOS added
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_tune_shapes_come_from_the_model_config(tiny_model_dir):
    from qqq.cli import linear_shapes

    # tiny llama: hidden 64, 4 heads of 16, 2 kv heads, intermediate 128
    # then the fused q/k/v (128 x 64, already listed) and gate/up (256 x 64) of qqq.fast
    assert linear_shapes(model_config(str(tiny_model_dir))) == [(64, 64), (32, 64), (128, 64), (64, 128), (256, 64)]


def test_tune_needs_a_gpu_here(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="CUDA"):
        main(["tune", str(tiny_model_dir)])


def test_tune_times_the_models_fused_gate_up_shape_with_its_epilogue(tiny_model_dir, monkeypatch):
    from qqq.kernels_triton import autotune

    asked, quick = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(autotune, "tune", lambda shapes, shipped_only, new_paths: (
        asked.extend(shapes), quick.append((shipped_only, new_paths))))
    main(["tune", str(tiny_model_dir), "--group-size", "-1", "128"])
    assert {(s.n, s.k) for s in asked if s.silu_mul} == {(256, 64)}
    assert len(asked) == 2 * 5  # the five linear shapes above, per-channel and g128
    assert {s.group_size for s in asked} == {-1, 128}
    # only the configs shipped for this chip, and those of the paths newer than the shipped files
    main(["tune", str(tiny_model_dir), "--quick"])
    assert quick == [(False, ()), (True, ("fused_ws_split_k",))]


def test_eval_zeroshot_scores_a_checkpoint_as_the_library_does(tiny_model_dir, tmp_path, capsys, reference_backend):
    zeroshot = pytest.importorskip("qqq.zeroshot")
    try:
        zeroshot.write_offline_tasks(["piqa", "winogrande"])
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    out = tmp_path / "w4a8"
    main(["quantize", str(tiny_model_dir), "--method", "w4a8_rtn", "--out", str(out), "--device", "cpu"])
    capsys.readouterr()
    main(["eval", "zeroshot", str(out), "--tasks", "piqa", "winogrande", "--limit", "3", "--max-length", "128",
          "--device", "cpu"])
    printed = {(m[1], m[2]): (float(m[3]), int(m[4]))
               for m in re.finditer(r"^(\w+) (acc\w*) ([\d.]+) \+- \S+ \((\d+) docs", capsys.readouterr().out, re.M)}
    model, tokenizer = load_model(str(out))
    expected = zeroshot.zero_shot(model, tokenizer, ["piqa", "winogrande"], limit=3, max_length=128, device="cpu")
    assert printed == {(r["task"], r["metric"]): (round(r["value"], 4), 3) for r in expected}
    assert set(printed) == {("piqa", "acc"), ("piqa", "acc_norm"), ("winogrande", "acc")}


@pytest.mark.parametrize("method", ["fp16", "checkpoint"])
def test_generate_prints_text_speed_and_the_greedy_check(tiny_model_dir, tmp_path, capsys, reference_backend,
                                                         method):
    model = str(tiny_model_dir)
    if method == "checkpoint":
        model = str(tmp_path / "w4a8")
        main(["quantize", str(tiny_model_dir), "--method", "w4a8_rtn", "--out", model, "--device", "cpu"])
        capsys.readouterr()
    main(["generate", model, "--prompt", "Hello there", "--max-new-tokens", "5", "--check", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.startswith("Hello there")
    assert re.search(r"decode [\d.]+ tokens/s", out) and ("qqq checkpoint" in out) == (method == "checkpoint")
    assert "check: the first 5 of 5 greedy tokens equal" in out


def test_generate_with_the_8_bit_kv_cache_and_an_old_method_name(tiny_model_dir, capsys, reference_backend):
    model = str(tiny_model_dir)
    main(["generate", model, "--prompt", "Hello there", "--max-new-tokens", "4", "--kv-bits", "8", "--check",
          "--device", "cpu"])
    out = capsys.readouterr().out
    assert "[unquantized, float32 model, 8-bit KV cache (keys smoothed, alpha 0.5)" in out  # SmoothAttention's default
    assert "check: the first 4 of 4 greedy tokens equal" in out
    assert "queries rounded as the 8-bit cache's attention takes them" in out
    main(["generate", model, "--max-new-tokens", "2", "--kv-bits", "8", "--kv-smooth", "0", "--device", "cpu"])
    assert "8-bit KV cache, " in capsys.readouterr().out
    main(["generate", model, "--max-new-tokens", "2", "--method", "qqq", "--device", "cpu"])
    captured = capsys.readouterr()
    assert "--method qqq is now called w4a8_rtn" in captured.err and "[w4a8_rtn, float32 model, 16-bit KV cache" in captured.out
    with pytest.raises(SystemExit):
        main(["generate", model, "--kv-bits", "4"])

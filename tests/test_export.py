import json
import re

import pytest
import torch
from conftest import tiny_model, token_batch

from qqq.checkpoint import check_output_folder, load_quantized, save_quantized
from qqq.cli import main
from qqq.export import export_compressed_tensors
from qqq.linear import FakeQuantLinear, QQQLinear
from qqq.model_families import family_of
from qqq.numerics import INT4_ZERO_POINT
from qqq.pipeline import QuantizeSettings, quantize_model

GROUP_SIZES = [-1, 32, 64, 128]  # the tiny models' 256 / 512 input channels take every one


def qqq_checkpoint(path, group_size: int, model_type: str = "llama", tokenizer=None):
    model = tiny_model(model_type)
    with torch.no_grad():  # an all-zero output channel: a zero scale, which the export must carry through
        model.model.layers[0].mlp.up_proj.weight[3] = 0
    quantize_model(model, "rtn", None, QuantizeSettings(group_size=group_size))
    save_quantized(model, path, tokenizer)
    return path


def decoder_linears(model) -> dict[str, torch.nn.Module]:
    family = family_of(model)
    return {f"model.layers.{i}.{name}": linear for i, layer in enumerate(family.decoder_layers(model))
            for name, linear in family.linears(layer).items()}


def exported_weight(layer: QQQLinear) -> torch.Tensor:
    """What the export must apply: the weight our checkpoint applies per channel; ``codes * channel_scale *
    ratio`` per group (QQQ's int8 rounding of ``codes * ratio`` left out)."""
    if not layer.per_group:
        return layer.dequantized_weight()
    group_scale = layer.channel_scale[:, None] * layer.group_ratio.float()
    codes = layer.codes().float() - INT4_ZERO_POINT
    return codes * group_scale.repeat_interleave(layer.group_size, dim=1)


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_the_library_decompresses_the_weights_our_checkpoint_applies(group_size, tmp_path):
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    export_compressed_tensors(qqq_checkpoint(tmp_path / "qqq", group_size), tmp_path / "ct")
    config = QuantizationConfig.model_validate(json.loads((tmp_path / "ct" / "config.json").read_text())
                                               ["quantization_config"])
    assert config.format == "pack-quantized" and config.ignore == ["lm_head"]
    (scheme,) = config.config_groups.values()
    assert scheme.weights.num_bits == 4 and scheme.weights.symmetric
    assert scheme.weights.strategy == ("channel" if group_size == -1 else "group")
    assert scheme.input_activations.num_bits == 8 and scheme.input_activations.strategy == "token"

    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    ours = decoder_linears(load_quantized(tmp_path / "qqq", dtype=torch.float32))
    for name, layer in ours.items():
        state = {key: tensors[f"{name}.{key}"] for key in ("weight_packed", "weight_scale", "weight_shape")}
        weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        assert torch.equal(weight, exported_weight(layer)), name


@pytest.mark.parametrize("model_type, group_size", [("llama", -1), ("qwen2", 64), ("llama", 128)])
def test_transformers_loads_the_export_like_our_fake_quant_forward(model_type, group_size, tmp_path,
                                                                   reference_backend):
    from transformers import AutoModelForCausalLM

    export_compressed_tensors(qqq_checkpoint(tmp_path / "qqq", group_size, model_type), tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    ours = load_quantized(tmp_path / "qqq", dtype=torch.float32)
    for name, layer in decoder_linears(ours).items():  # our fake-quant forward of the exported weights
        parent, _, child = name.rpartition(".")
        setattr(ours.get_submodule(parent), child, FakeQuantLinear(exported_weight(layer), layer.bias, True))
    ids = token_batch(2, 24, seed=3)
    with torch.no_grad():
        theirs, expected = loaded(ids).logits, ours(ids).logits
        for name, linear in decoder_linears(loaded).items():  # decompressed on the first forward
            assert torch.equal(linear.weight, ours.get_submodule(name).weight), name
            linear.quantization_enabled = False
            ours.get_submodule(name).quantize_input = False
        # with 16-bit activations both apply the same weights: equal up to the order of float additions
        assert torch.allclose(loaded(ids).logits, ours(ids).logits, atol=1e-5)
    # with int8 activations, compressed-tensors' fake quantization scales them by amax / 127.5 (its int8 range is
    # [-128, 127]), QQQ (and vLLM's int8 kernels) by amax / 127: the logits differ by that rounding only.
    assert (theirs - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_importing_an_export_gives_back_our_codes(group_size, tmp_path, reference_backend):
    export_compressed_tensors(qqq_checkpoint(tmp_path / "qqq", group_size, "qwen2"), tmp_path / "ct")
    original = load_quantized(tmp_path / "qqq", dtype=torch.float32)
    imported = load_quantized(tmp_path / "ct", dtype=torch.float32)
    for name, layer in decoder_linears(imported).items():
        ours = original.get_submodule(name)
        assert isinstance(layer, QQQLinear) and layer.group_size == group_size, name
        assert torch.equal(layer.codes(), ours.codes()), name
        assert torch.equal(layer.bias, ours.bias) if ours.bias is not None else layer.bias is None
        if group_size == -1:
            assert torch.equal(layer.channel_scale, ours.channel_scale), name
        else:  # two-level scales derived again from the group scales: the weight stays within half an int8
            # step of the export's, plus the fp16 rounding of the new ratio (at most 127 * 2**-11 steps)
            error = (layer.dequantized_weight() - exported_weight(ours)).abs()
            assert (error <= (0.5 + 127 * 2**-11) * 1.0001 * layer.channel_scale[:, None]).all(), name
    if group_size == -1:  # the per-channel mapping is exact both ways
        ids = token_batch(1, 16, seed=5)
        with torch.no_grad():
            assert torch.equal(imported(ids).logits, original(ids).logits)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "the": 1, "capital": 2, "of": 3, "france": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_a_sharded_export_keeps_the_tokenizer_and_loads_everywhere(tmp_path, reference_backend):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_compressed_tensors(qqq_checkpoint(tmp_path / "qqq", 64, tokenizer=tiny_tokenizer()), tmp_path / "ct",
                              max_shard_size="300KB")
    shards = sorted(p.name for p in (tmp_path / "ct").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "ct" / "model.safetensors.index.json").exists()
    assert AutoTokenizer.from_pretrained(tmp_path / "ct")("the capital of france").input_ids == [1, 2, 3, 4]
    with torch.no_grad():
        assert torch.isfinite(AutoModelForCausalLM.from_pretrained(tmp_path / "ct")(token_batch(1, 12)).logits).all()
    imported = load_quantized(tmp_path / "ct", dtype=torch.float32)
    original = load_quantized(tmp_path / "qqq", dtype=torch.float32)
    for name, layer in decoder_linears(imported).items():
        assert torch.equal(layer.codes(), original.get_submodule(name).codes()), name
    assert torch.equal(imported.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert torch.equal(imported.lm_head.weight, original.lm_head.weight)


def test_exporting_a_model_that_is_not_a_qqq_checkpoint_is_an_error(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a QQQ checkpoint"):
        export_compressed_tensors(tmp_path / "plain", tmp_path / "ct")
    with pytest.raises(SystemExit, match="qqq: error: .* not a QQQ checkpoint"):
        main(["export", str(tmp_path / "plain"), "--out", str(tmp_path / "ct")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


def test_an_existing_output_folder_is_kept_unless_forced(tmp_path):
    checkpoint = qqq_checkpoint(tmp_path / "qqq", -1)
    out = tmp_path / "ct"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="qqq: error: .* already holds files: .* pass --force"):
        main(["export", str(checkpoint), "--out", str(out)])
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    main(["export", str(checkpoint), "--out", str(out), "--force"])
    assert (out / "config.json").exists() and not (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "qqq"]


def test_export_refuses_an_output_folder_as_quantize_does(tmp_path):
    """One set of checks for both commands' --out: the same refusal, word for word, and nothing touched."""
    checkpoint = qqq_checkpoint(tmp_path / "qqq", -1)
    (tmp_path / "taken.txt").write_text("keep me")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    for out in (tmp_path / "taken.txt", tmp_path / "full"):
        with pytest.raises(FileExistsError) as quantize_refusal:
            check_output_folder(out, source=checkpoint)
        with pytest.raises(FileExistsError, match=f"^{re.escape(str(quantize_refusal.value))}$"):
            export_compressed_tensors(checkpoint, out)
    assert (tmp_path / "taken.txt").read_text() == "keep me"
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "qqq", "taken.txt"]


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    from compressed_tensors.compressors import ModelCompressor

    def fail(self, save_directory):
        raise OSError("disk full")

    checkpoint = qqq_checkpoint(tmp_path / "qqq", 32)
    monkeypatch.setattr(ModelCompressor, "update_config", fail)
    with pytest.raises(OSError, match="disk full"):
        export_compressed_tensors(checkpoint, tmp_path / "ct")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qqq"]


@pytest.mark.parametrize("change, message", [
    (lambda q: q["weights"].update(symmetric=False), "weights int 4-bit, group 64, asymmetric"),
    (lambda q: q["weights"].update(num_bits=8), "weights int 8-bit"),
    (lambda q: q["weights"].update(group_size=16), "group size 16"),
    (lambda q: q["input_activations"].update(type="float"), "activations float 8-bit"),
    (lambda q: q.pop("input_activations"), "activations none"),
])
def test_importing_what_qqq_cannot_run_names_what_it_found(change, message, tmp_path):
    export_compressed_tensors(qqq_checkpoint(tmp_path / "qqq", 64), tmp_path / "ct")
    config_file = tmp_path / "ct" / "config.json"
    config = json.loads(config_file.read_text())
    change(config["quantization_config"]["config_groups"]["group_0"])
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_quantized(tmp_path / "ct")

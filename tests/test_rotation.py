import pytest
import torch
from conftest import tiny_model, token_batch

from qqq.model_families import family_of
from qqq.rotation import fold_norms, hadamard, random_orthogonal, rotate_model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_rotations_are_orthogonal():
    for q in (hadamard(64), random_orthogonal(36, torch.Generator().manual_seed(0))):
        assert torch.allclose(q @ q.T, torch.eye(q.shape[0], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(hadamard(8).abs(), torch.full((8, 8), 8 ** -0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="power of two"):
        hadamard(48)


@pytest.mark.parametrize("model_type,tied,hidden,heads", [("llama", False, 256, 4), ("qwen2", False, 288, 6),
                                                          ("llama", True, 192, 6)])
def test_rotation_leaves_the_fp_logits_unchanged(model_type, tied, hidden, heads):
    model = tiny_model(model_type, hidden=hidden, heads=heads, kv_heads=2)  # GQA: 2 key/value heads
    family = family_of(model)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():  # norms that are not ones, so that folding them matters
        for norm in [layer.post_attention_layernorm for layer in model.model.layers] + [model.model.norm]:
            norm.weight.mul_(torch.rand_like(norm.weight) + 0.5)
    ids = token_batch(2, 24)
    before = logits(model, ids)
    v_before = model.model.layers[0].self_attn.v_proj.weight.clone()
    rotate_model(model, family)
    assert torch.allclose(logits(model, ids), before, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(model.model.layers[0].self_attn.v_proj.weight, v_before, atol=1e-3)
    assert all((layer.input_layernorm.weight == 1).all() for layer in model.model.layers)
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_folding_the_norms_alone_keeps_the_logits():
    model = tiny_model("qwen2")
    ids = token_batch(2, 16)
    before = logits(model, ids)
    fold_norms(model, family_of(model))
    assert torch.allclose(logits(model, ids), before, rtol=1e-5, atol=1e-5)

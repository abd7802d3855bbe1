"""Rotation, as QQQ's repository does after the paper (QuaRot-style, all folded into the weights: nothing runs
online, so inference costs nothing more).

1. Every RMSNorm weight is folded into the linears it feeds (the norm then only divides by the RMS, which an
   orthogonal rotation leaves unchanged); tied embeddings are untied first, since the lm_head absorbs the final
   norm and the embeddings do not.
2. One random orthogonal matrix ``Q`` rotates the residual stream: the embeddings and every linear that writes
   the residual (o_proj, down_proj) are multiplied by ``Q`` on their output side, every linear that reads it
   (q/k/v, gate/up, lm_head) by ``Q`` on their input side. (Any hidden size: 576 and 896 are no powers of two.)
3. An exact Hadamard matrix per attention head (a random orthogonal one where head_dim is no power of two)
   rotates the v_proj outputs and, with it, the o_proj inputs of every query head that reads them.

The FP model computes the same function; its weights and activations are spread over all channels, which
evens out the outliers that 4-bit weights and 8-bit activations lose most to.
"""

from __future__ import annotations

import torch
from torch import nn

from qqq.model_families import ModelFamily

ROTATION_SEED = 0


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal [n, n] matrix (float64), uniform over the orthogonal group (QR of a Gaussian with
    the signs of R's diagonal folded into Q)."""
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return q * torch.sign(torch.diagonal(r))


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order ``n`` (a power of two), float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester-Hadamard matrix needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / n ** 0.5


def _set(linear_or_embedding: nn.Module, weight: torch.Tensor) -> None:
    linear_or_embedding.weight.data = weight.to(linear_or_embedding.weight.dtype)


@torch.no_grad()
def untie_lm_head(model: nn.Module, family: ModelFamily) -> None:
    lm_head = family.lm_head(model)
    if lm_head.weight is family.embeddings(model).weight:
        lm_head.weight = nn.Parameter(lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False


@torch.no_grad()
def fold_norms(model: nn.Module, family: ModelFamily) -> None:
    """Fold each RMSNorm weight into the input columns of the linears it feeds and set it to ones."""
    untie_lm_head(model, family)
    pairs = [(layer.get_submodule(norm), [layer.get_submodule(name) for name in consumers])
             for layer in family.decoder_layers(model) for norm, consumers in family.norm_consumers]
    pairs.append((family.final_norm(model), [family.lm_head(model)]))
    for norm, consumers in pairs:
        for linear in consumers:
            _set(linear, linear.weight.double() * norm.weight.double())
        norm.weight.data = torch.ones_like(norm.weight)


@torch.no_grad()
def rotate_model(model: nn.Module, family: ModelFamily, seed: int = ROTATION_SEED) -> None:
    """Fold the norms, then rotate the residual stream and each head's values (the FP function is unchanged)."""
    fold_norms(model, family)
    generator = torch.Generator().manual_seed(seed)
    q = random_orthogonal(model.config.hidden_size, generator)
    heads, kv_heads, head_dim = family.head_layout(model)
    per_head = hadamard(head_dim) if head_dim & (head_dim - 1) == 0 else random_orthogonal(head_dim, generator)
    embeddings = family.embeddings(model)
    _set(embeddings, embeddings.weight.double() @ q)
    for layer in family.decoder_layers(model):
        for name in family.residual_readers:
            linear = layer.get_submodule(name)
            _set(linear, linear.weight.double() @ q)
        for name in family.residual_writers:
            linear = layer.get_submodule(name)
            _set(linear, q.T @ linear.weight.double())
            if linear.bias is not None:
                linear.bias.data = (linear.bias.double() @ q).to(linear.bias.dtype)
        value, out = layer.get_submodule(family.value_projection), layer.get_submodule(family.attention_projection)
        # v_h -> v_h H for every key/value head; o_proj's columns of each query head absorb H^T
        _set(value, (per_head.T @ value.weight.double().view(kv_heads, head_dim, -1)).reshape(value.weight.shape))
        if value.bias is not None:
            value.bias.data = (value.bias.double().view(kv_heads, head_dim) @ per_head).reshape(-1).to(value.bias.dtype)
        _set(out, (out.weight.double().view(out.out_features, heads, head_dim) @ per_head).reshape(out.weight.shape))
    lm_head = family.lm_head(model)
    _set(lm_head, lm_head.weight.double() @ q)

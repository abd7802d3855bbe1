"""End-to-end inference for Llama-family decoders, one harness for FP16, W8A8, W4A16 and W4A8.

- :mod:`qqq.fast.backend`: the one rule that picks a Triton kernel or its plain PyTorch reference;
- :mod:`qqq.fast.producers`: the fused producers (residual add + RMSNorm, SiLU * up, RoPE into the KV cache) and
  their plain references, which the kernels of ``qqq.kernels_triton.fused_producers`` are tested against;
- :mod:`qqq.fast.attention`: the static KV cache (16-bit, or int8 with per-token, per-head scales) and attention
  over it;
- :mod:`qqq.fast.projections`: the linear formats (``METHODS``), q/k/v and gate/up fused into one GEMM each;
- :mod:`qqq.fast.model`: ``FastLlama``, the decoder graph;
- :mod:`qqq.fast.generation`: ``Generator``, eager prefill and one CUDA-graph replay per greedy decode step.

On a CPU without ``TRITON_INTERPRET=1`` every op runs its plain PyTorch reference.
"""

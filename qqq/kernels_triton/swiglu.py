"""Llama's ``SiLU(gate) * up`` as a Triton helper, rounded as the model rounds it: shared by the SiLU*up producer
(``fused_producers``) and the int8 GEMM epilogues (``int8_gemm``, and the Gluon ``int8_gemm_ws``, which can call a
Triton helper). A leaf module, so that ``int8_gemm_ws`` can import it without a cycle through ``int8_gemm``."""

import triton
import triton.language as tl


@triton.jit
def silu_times_up(gate, up):
    """Llama's ``SiLU(gate) * up`` on 16-bit values, rounded where PyTorch rounds (after the SiLU, after the
    product)."""
    silu = (gate.to(tl.float32) / (1.0 + tl.exp(-gate.to(tl.float32)))).to(gate.dtype)
    return (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)

"""qqq: W4A8 quantization of LLMs after QQQ (adaptive smoothing + GPTQ) with Triton W4A8 kernels."""

from qqq.linear import FakeQuantLinear, QQQLinear
from qqq.pipeline import METHODS, QuantizeSettings, get_method, quantize_model, round_weights, smooth

__all__ = ["QQQLinear", "FakeQuantLinear", "METHODS", "QuantizeSettings", "get_method", "quantize_model",
           "round_weights", "smooth"]

"""Triton kernels for W4A8 inference and the int4 packing they read."""

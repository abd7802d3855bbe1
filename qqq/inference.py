"""Moved: the fast inference path is the ``qqq.fast`` package now. This module only re-exports the old names for
code not yet updated (``tests/test_gpu.py``); import from ``qqq.fast.*`` instead."""

import warnings

from qqq.fast.attention import KVCache, attention  # noqa: F401
from qqq.fast.generation import GenerationResult, Generator  # noqa: F401
from qqq.fast.model import Architecture, FastDecoderLayer, FastLlama, rope_tables  # noqa: F401
from qqq.fast.producers import (Int8Rows, quantize_rows, rmsnorm_reference, rope_into_cache_reference,  # noqa: F401
                                silu_mul_reference)
from qqq.fast.projections import (METHOD_NOTES, METHODS, W4A8Projection, fused_projection,  # noqa: F401
                                  projection_from_weight, reference_linear)

warnings.warn("qqq.inference moved to the qqq.fast package (qqq.fast.model, qqq.fast.generation, ...)",
              DeprecationWarning, stacklevel=2)

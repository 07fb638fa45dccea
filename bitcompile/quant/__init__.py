"""Quantization primitives, weight quantizers and ternary tensors, for eager experiments and as
the backend's custom weight quantizers.

Built on the same definitions as the backend (``bitcompile.ops``): the default ternary
quantizer here is the backend's BitNet b1.58 absmean quantizer.
"""

import warnings

from bitcompile.numerics.packing import pack_ternary, unpack_ternary
from bitcompile.quant.functional import (
    fake_quantize_activations,
    quantized_conv2d,
    quantized_linear,
    quantized_linear_with,
    quantized_matmul,
)
from bitcompile.quant.gradients import (
    QuantizedBatchNorm2d,
    clipped_ste_quantize,
    differentiable_sparse_quantize,
    gumbel_softmax_quantize,
    progressive_quantize,
    quantized_batch_norm,
    soft_quantize,
    ste_quantize,
    straight_through,
    threshold_for_sparsity,
)
from bitcompile.quant.primitives import (
    QuantizationReport,
    adaptive_threshold_quantize,
    affine_dequantize,
    dequantize,
    learned_quantize,
    stochastic_quantize,
    ternary_quantize,
    threshold_quantize,
    validate_quantization,
    xnor_quantize,
)
from bitcompile.quant.quantizers import (
    BaseQuantizer,
    LayerAdaptiveQuantizer,
    MixedPrecisionQuantizer,
    PercentileQuantizer,
    PerLayerQuantizer,
    TernaryQuantizer,
    WeightQuantizer,
    check_quantizer,
    fake_quantize,
)
from bitcompile.quant.schemes import (
    BlockwiseMixedPrecisionQuantizer,
    LogQuantizer,
    LSQQuantizer,
    OutlierAwareQuantizer,
    SoftQuantizer,
)
from bitcompile.quant.tensor import QuantizedTensor, TernaryTensor

__all__ = [
    "TernaryTensor", "QuantizedTensor", "pack_ternary", "unpack_ternary",
    "ternary_quantize", "threshold_quantize", "adaptive_threshold_quantize", "stochastic_quantize",
    "learned_quantize", "xnor_quantize", "dequantize", "affine_dequantize",
    "quantized_linear", "quantized_linear_with", "quantized_conv2d", "quantized_matmul", "fake_quantize_activations",
    "straight_through", "ste_quantize", "clipped_ste_quantize", "soft_quantize", "gumbel_softmax_quantize",
    "progressive_quantize", "differentiable_sparse_quantize", "threshold_for_sparsity",
    "quantized_batch_norm", "QuantizedBatchNorm2d", "QuantizationReport", "validate_quantization",
    "WeightQuantizer", "BaseQuantizer", "TernaryQuantizer", "PercentileQuantizer", "LayerAdaptiveQuantizer",
    "MixedPrecisionQuantizer", "PerLayerQuantizer", "fake_quantize", "check_quantizer",
    "LogQuantizer", "LSQQuantizer", "SoftQuantizer", "BlockwiseMixedPrecisionQuantizer", "OutlierAwareQuantizer",
]  # fmt: skip


def __getattr__(name):
    if name == "Quantizer":  # the protocol's former name; bitcompile.Quantizer swaps a model's linears
        warnings.warn(
            "bitcompile.quant.Quantizer is now bitcompile.quant.WeightQuantizer", DeprecationWarning, stacklevel=2
        )
        return WeightQuantizer
    raise AttributeError(f"module 'bitcompile.quant' has no attribute {name!r}")

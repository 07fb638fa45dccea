"""The bottom layer: what the numbers mean, in plain torch.

``spec`` (schemes, bit widths, clamps), ``packing`` (the canonical 2-bit format and the
kernels' K-blocked layout) and ``reference`` (every quantizer, matmul and fused form as
plain torch: the oracle each kernel and rewrite is tested against). Nothing here imports
the rest of bitcompile; kernels import only this layer.
"""

"""Convolution formulations for XLA:CPU (the "fast" implementation of `latentfm.nn.layers`).

Same functions as XLA's own convolutions, arranged so that XLA:CPU runs them and their gradients
quickly: `strided` (strided and transposed convolutions as stride-1 ones), `slab_conv` (stride-1
3D convolutions as 2D ones over depth slabs, with a custom VJP), `winograd` (depth taps as
Winograd tiles), `tap_products` (one-output-channel convolutions and small input gradients as
matrix products) and `edge_pad` (replicate padding with a light gradient). Reverse mode only:
`jax.jvp` needs the "lax" implementation.
"""

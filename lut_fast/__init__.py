"""lut-fast: a high-throughput trainer for LUT (Learning with Unmasked Tokens).

Sub-packages: ``lut_fast.models`` (ViT, MAE, LUT), ``lut_fast.pipelines``
(augmentation spec and data backends), ``lut_fast.datasets`` (image folders,
the built-in dataset, converters).
"""

__version__ = "0.1.0"

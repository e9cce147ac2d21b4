"""Image folders, the built-in dataset, and converters to FFCV and DALI formats.

Installed as ``lut_fast.datasets`` so it never shadows PyPI's ``datasets``.
"""

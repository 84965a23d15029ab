"""Triton kernels for minillm, each file beside a plain-PyTorch reference of what it computes.

Imported as `minillm.kernels` (see pyproject.toml); this package imports only torch and triton.
"""

"""Triton kernels for the Kakeya block formats (layouts from kakeya_kv.format)."""

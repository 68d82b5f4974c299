"""Kakeya KV core: block-format specification, CPU reference codecs, evaluation.

The block format is defined once in :mod:`kakeya_kv.format`; the CPU reference
codecs (:mod:`kakeya_kv.codecs`), the Triton kernels (``kakeya_kernels``) and the
vLLM allocator (``kakeya_v1_3_ppl``) all read sizes and offsets from there.
"""

__version__ = "0.1.0"

"""Kakeya KV as a vLLM 0.26 attention backend.

``pip install`` registers :func:`register` under the ``vllm.general_plugins`` entry point; vLLM
calls it in every process (front end, engine core, workers). Then
``vllm serve MODEL --attention-backend KAKEYA`` (or ``CUSTOM``) selects it. ``KAKEYA`` is an alias
of the ``CUSTOM`` enum member, so it pickles by CUSTOM's value and survives spawned workers.
Knobs: ``KAKEYA_*`` environment variables, see :mod:`kakeya_kv.config`.
"""
from __future__ import annotations

BACKEND_PATH = "kakeya_v1_3_ppl.backend.KakeyaBackend"


def register() -> None:
    """Idempotent: register the backend under CUSTOM, add the KAKEYA alias, install the hooks."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    # An alias (name -> existing member): AttentionBackendEnum["KAKEYA"] is CUSTOM.
    AttentionBackendEnum._member_map_.setdefault("KAKEYA", AttentionBackendEnum.CUSTOM)
    from . import patches
    patches.apply()

"""quality.json assembly (issue 5): statistics, top-k KLD, not-measured reporting, schema, reports."""
import json
import math

import numpy as np
import pytest

from kakeya_kv import quality, report


def _lsm(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _topk(lp, k):
    ids = np.argsort(-lp, -1)[:, :k]
    return ids, np.take_along_axis(lp, ids, -1)


def test_mean_ci_and_paired_delta():
    m, ci = quality.mean_ci([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and ci[0] < 2.5 < ci[1]
    assert quality.mean_ci([1.0])[1] is None
    ppl, pci = quality.ppl_with_ci([2.0, 2.2, 1.8])
    assert ppl == pytest.approx(math.exp(2.0)) and pci[0] < ppl < pci[1]
    d, dci = quality.paired_delta_pct([2.1, 2.3, 1.9], [2.0, 2.2, 1.8])
    assert d == pytest.approx(100 * (math.exp(0.1) - 1)) and dci[0] == pytest.approx(dci[1])   # constant shift
    assert quality.paired_delta_pct([2.0, 2.2], [2.0, 2.2])[0] == 0.0


def test_kld_topk_full_vocab_is_exact_and_topk_is_close():
    rng = np.random.default_rng(0)
    V, N = 50, 64
    logits = rng.normal(0, 3, (N, V))
    p, q = _lsm(logits), _lsm(logits + rng.normal(0, 0.3, (N, V)))
    exact = (np.exp(p) * (p - q)).sum(-1)
    full = quality.kld_topk(*_topk(p, V), *_topk(q, V))
    np.testing.assert_allclose(full, exact, rtol=1e-9, atol=1e-12)
    same = quality.kld_topk(*_topk(p, 10), *_topk(p, 10))
    np.testing.assert_allclose(same, 0.0, atol=1e-12)
    est = quality.kld_topk(*_topk(p, 20), *_topk(q, 20))
    assert (est >= -1e-12).all()
    assert abs(est.mean() - exact.mean()) < 0.2 * exact.mean()      # peaked distributions: top-20 captures most


def test_kld_topk_token_missing_from_config_topk_counts():
    base_ids, base_lp = np.array([[1, 2]]), np.log(np.array([[0.6, 0.3]]))
    moved_ids, moved_lp = np.array([[1, 3]]), np.log(np.array([[0.6, 0.3]]))   # token 2 fell out of the top-k
    assert quality.kld_topk(base_ids, base_lp, moved_ids, moved_lp)[0] > 0.01
    assert quality.kld_topk(base_ids, base_lp, base_ids, base_lp)[0] == pytest.approx(0.0, abs=1e-12)


def _raw(name, family, nll, ids=None, **kw):
    ids = list(range(len(nll))) if ids is None else ids
    return {"name": name, "family": family, "ratio_vs_bf16": kw.pop("ratio", 1.0), "window_ids": ids,
            "window_nll": nll, "niah_4k": 1.0, "niah_8k": 0.5, **kw}


def _doc():
    base = _raw("flash_bf16", "bf16", [3.0, 3.1, 2.9, 3.2], window_kld=[0.0] * 4)
    tq = _raw("turboquant_4bit_nc", "turboquant", [3.02, 3.13, 2.93, 3.21], ratio=2.7, window_kld=[0.01] * 4)
    tq2 = _raw("turboquant_3bit_nc", "turboquant", [3.05, 3.16, 2.95], ratio=3.16)       # 3 of 4 windows, no KLD
    ours = _raw("kakeya_k4v3", "kakeya", [3.01, 3.11, 2.91, 3.21], ratio=4.15, window_kld=[0.004] * 4)
    dead = {"name": "turboquant_k8v4", "family": "turboquant",
            "not_measured": [{"what": "config", "reason": "killed at the 150 s limit in phase 'load'"}]}
    head = {"gpu": "NVIDIA H200", "model": "m", "corpus": "c", "windows": 4}
    return quality.document(head, [base, tq, tq2, ours, dead], "flash_bf16")


def test_document_fields_and_not_measured_reasons():
    doc = _doc()
    quality.validate(doc)
    by = {r["name"]: r for r in doc["configs"]}
    assert by["flash_bf16"]["delta_ppl_pct"] == 0.0 and by["flash_bf16"]["kld"] == 0.0
    assert by["kakeya_k4v3"]["delta_ppl_pct"] == pytest.approx(100 * (math.exp(0.01) - 1))
    assert by["turboquant_3bit_nc"]["delta_windows"] == 3 and by["turboquant_3bit_nc"]["kld"] is None
    dead = by["turboquant_k8v4"]
    assert all(dead[k] is None for k in ("ppl", "kld", "niah_4k", "ratio_vs_bf16"))
    reasons = {(m["name"], m["what"]): m["reason"] for m in doc["not_measured"]}
    assert "150 s limit" in reasons[("turboquant_k8v4", "ppl")]        # the config-level reason on every field
    assert ("turboquant_3bit_nc", "kld") in reasons
    assert json.loads(json.dumps(doc)) == doc                            # plain JSON


def test_validate_rejects_unexplained_nulls_and_bad_types():
    doc = _doc()
    r = next(r for r in doc["configs"] if r["name"] == "kakeya_k4v3")
    r["niah_8k"] = None
    with pytest.raises(ValueError, match="niah_8k is null but not listed"):
        quality.validate(doc)
    r["niah_8k"] = 1
    with pytest.raises(ValueError, match="finite float"):
        quality.validate(doc)
    doc = _doc()
    doc["windows"] = "4"
    with pytest.raises(ValueError, match="'windows'"):
        quality.validate(doc)


def test_protocol_check_catches_turboquant_equal_to_bf16():
    doc = _doc()
    assert doc["protocol_check"]["ok"] is True
    rows = [_raw("flash_bf16", "bf16", [3.0, 3.1]), _raw("turboquant_k8v4", "turboquant", [3.0, 3.1]),
            _raw("turboquant_4bit_nc", "turboquant", [3.0, 3.2])]
    pc = quality.protocol_check([quality.row(r, rows[0]) for r in rows], "flash_bf16")
    assert pc["ok"] is False and pc["differs_from_baseline"]["turboquant_k8v4"] is False


def test_reports(tmp_path):
    doc = _doc()
    md = report.quality_markdown(doc)
    assert "| kakeya_k4v3 | kakeya | 4.15 |" in md and "NOT MEASURED: killed at the 150 s limit" in md
    assert "turboquant_4bit_nc (2.70" not in md and "kakeya_k4v3 (4.15×" in md     # ours beats it: listed
    report.plot_quality(doc, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 10_000
    v4 = report.issue4_doc(doc)
    assert [r["name"] for r in v4["configs"]] == []          # no capacity_tokens in these rows
    for r in doc["configs"]:
        r["capacity_tokens"] = 1000
    assert len(report.issue4_doc(doc)["configs"]) == 4 and "| kakeya_k4v3 |" in report.issue4_markdown(report.issue4_doc(doc))
    hf = _doc()
    hf["windows"] = 2
    gap = report.gap_markdown(hf, doc, notes="analysis")
    assert "Different window counts" in gap and "| kakeya_k4v3 | 4.15 | 4.15 | +1.01" in gap and gap.endswith("analysis\n")


def test_gap_report_from_legacy_documents(tmp_path):
    fmt = lambda n, fam, ratio, d: {"name": n, "family": fam, "ratio_vs_bf16": ratio, "ppl": 27.0 * (1 + d / 100),
                                    "delta_ppl_pct": d, "delta_ppl_pct_ci95": [d - 0.1, d + 0.1], "kld": d / 100}
    cc = {"model": "m", "corpus": "c", "windows": 2, "formats": [fmt("bf16", "bf16", 1.0, 0.0),
                                                                  fmt("kakeya_k4v3", "kakeya", 4.16, 0.19),
                                                                  fmt("fp8_e4m3", "fp8", 2.0, 0.07)]}
    semantics = {**cc, "formats": [fmt("bf16", "bf16", 1.0, 0.0), fmt("fp8_e4m3", "fp8", 2.0, 1.38)]}
    old = {"gpu": "H200", "model": "m", "windows": 2, "chunk": 256, "configs": [
        {"name": "flash_bf16", "family": "bf16", "capacity_tokens": 100, "window_nll": [3.0, 3.1]},
        {"name": "kakeya_k4v3", "family": "kakeya", "capacity_tokens": 415, "window_nll": [3.01, 3.1]},
        {"name": "triton_fp8", "family": "fp8", "capacity_tokens": 200, "window_nll": [3.02, 3.12]},
        {"name": "broken", "error": "x"}]}
    for name, d in (("cc.json", cc), ("sem.json", semantics), ("old.json", old)):
        (tmp_path / name).write_text(json.dumps(d))
    quality.validate(quality.load_any(tmp_path / "cc.json"))
    v = quality.load_any(tmp_path / "old.json")
    quality.validate(v)
    assert {r["name"]: r["ratio_vs_bf16"] for r in v["configs"]}["kakeya_k4v3"] == 4.15
    (tmp_path / "notes.md").write_text("why")
    report.main(["gap", "--hf", str(tmp_path / "cc.json"), "--hf", str(tmp_path / "sem.json"), "--vllm",
                 str(tmp_path / "old.json"), "--notes", str(tmp_path / "notes.md"), "--out", str(tmp_path / "g.md")])
    g = (tmp_path / "g.md").read_text()
    assert "| triton_fp8 | 2.00 | 2.00 | +1.38" in g            # the later HF document's row wins
    assert "| kakeya_k4v3 | 4.16 | 4.15 | +0.19" in g and g.rstrip().endswith("why")


def test_hf_rows_join_vllm_names():
    from types import SimpleNamespace as NS

    from kakeya_kv.codecs.base import BF16
    from kakeya_kv.codecs.kakeya import KakeyaCodec
    from kakeya_kv.hf_eval import raw_rows
    from kakeya_kv.model_format import ModelFormat
    from kakeya_kv.vllm_configs import resolve
    bf, k = ModelFormat("bf16", "bf16", BF16()), ModelFormat("kakeya_k4v3", "kakeya", KakeyaCodec(4, 3))
    res = lambda f, nll, kld: NS(fmt=f, nll=nll, kld=kld, top1=[1.0] * len(nll))
    configs = [resolve("flash_bf16"), resolve("kakeya_k4v3"), resolve("triton_bf16")]
    rows = raw_rows(configs, [bf, k, None], res(bf, [3.0, 3.1], [0.0, 0.0]), [res(k, [3.01, 3.12], [0.004, 0.005])],
                    (30, 3, 64), [{"name": "kakeya_k4v3", "niah_4k": 1.0, "niah_4k_hits": [True]}])
    doc = quality.document({"gpu": "cpu (HF harness)", "model": "m", "corpus": "c", "windows": 2}, rows, "flash_bf16")
    quality.validate(doc)
    by = {r["name"]: r for r in doc["configs"]}
    assert by["kakeya_k4v3"]["ratio_vs_bf16"] == pytest.approx(256 / 61.5) and by["kakeya_k4v3"]["niah_4k"] == 1.0
    assert by["kakeya_k4v3"]["kld"] == pytest.approx(0.0045)
    assert by["triton_bf16"]["not_measured"][0]["reason"] == "no HF/CPU twin for this vLLM config"

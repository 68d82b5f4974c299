"""Bad input gets a one-line, actionable error at start-up (issue 7, CPU part); no pickle anywhere; the runtime
has no network path."""
import ast
import json
import os
import re
from pathlib import Path

import pytest
import torch

from kakeya_calibration.bundle import MANIFEST, TENSORS, BundleError, load_bundle, write_bundle
from kakeya_kv.config import ConfigError
from kakeya_v1_3_ppl.checks import (check_block_size, check_capacity, check_layer, check_selection,
                                    known_env_names, settings)

ROOT = Path(__file__).resolve().parent.parent

OK = dict(head_size=64, alibi=False, sliding_window=None, logits_soft_cap=None, attn_type="decoder",
          kv_cache_dtype="auto", kv_sharing=False)


@pytest.mark.parametrize("env,msg", [
    ({"KAKEYA_BOUNDARY_SKIP_LAYERS": "0,x"}, "'x' is not an integer"),
    ({"KAKEYA_BOUNDARY_SKIP_LAYERS": "0,30"}, "out of range"),
    ({"KAKEYA_BOUNDARY_SKIP_LAYERS": "1,1"}, "listed twice"),
    ({"KAKEYA_BOUNDARY_SKIP_LAYERS": "-1"}, "negative"),
    ({"KAKEYA_SKIP_LAYERS": "0,,2"}, "empty entry"),
    ({"KAKEYA_FORMAT": "zstd"}, "unknown format"),
    ({"KAKEYA_K_BITS": "four"}, "not an integer"),
    ({"KAKEYA_V_BITS": "9"}, "must be one of"),
])
def test_malformed_settings(env, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        settings(30, env)
    assert "\n" not in str(e.value) and "KAKEYA_" in str(e.value)


def test_v13_is_served_except_with_graphs_or_calibration(tmp_path):
    assert settings(30, {"KAKEYA_FORMAT": "v13"}).format == "v13"
    with pytest.raises(ConfigError, match="KAKEYA_CUDA_GRAPHS"):
        settings(30, {"KAKEYA_FORMAT": "v13", "KAKEYA_CUDA_GRAPHS": "1"})
    with pytest.raises(ConfigError, match="calibration bundles are for the default format"):
        settings(30, {"KAKEYA_FORMAT": "v13", "KAKEYA_CALIBRATION": str(tmp_path)})


@pytest.mark.parametrize("override,msg", [
    (dict(alibi=True), "ALiBi"), (dict(sliding_window=4096), "sliding window"),
    (dict(logits_soft_cap=30.0), "soft-cap"), (dict(attn_type="encoder_only"), "encoder_only"),
    (dict(kv_cache_dtype="fp8"), "kv-cache-dtype fp8"), (dict(kv_sharing=True), "KV sharing"),
    (dict(head_size=96), "head_dim 96"), (dict(head_size=80), "supported: 64, 128, 256"),
])
def test_unsupported_attention_is_refused(override, msg):
    check_layer(**OK)
    with pytest.raises(ValueError, match=msg) as e:
        check_layer(**{**OK, **override})
    assert "--attention-backend" in str(e.value)


def test_block_size_and_capacity():
    check_block_size(512)
    check_block_size(1024)
    with pytest.raises(ValueError, match="--block-size 512"):
        check_block_size(16)
    check_capacity(8, 512, 4096)
    with pytest.raises(ValueError, match="needs 8"):
        check_capacity(7, 512, 4096)


def test_no_pickle_anywhere():
    """Files are read as safetensors/JSON only: no pickle, no torch.load, no numpy pickles."""
    root = ROOT
    bad = re.compile(r"\bimport (c?pickle|joblib|shelve|dill|cloudpickle)\b|\bpickle\.loads?\(|\btorch\.load\(|"
                     r"allow_pickle\s*=\s*True|\bmarshal\.loads?\(")
    hits = []
    for p in root.rglob("*.py"):
        if any(part.startswith(".") for part in p.relative_to(root).parts) or p.name == Path(__file__).name:
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if bad.search(line):
                hits.append(f"{p.relative_to(root)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_tail_pool_is_bounded_and_refused_when_too_large():
    from kakeya_v1_3_ppl.checks import check_tail_pool, tail_pool_bytes
    # SmolLM2: 30 layers x 3 heads x 64, 8 rows -> 30 * 8 * 512 * 3 * 64 * 4 B = 90 MiB
    assert tail_pool_bytes(8, 3, 64, 30) == 8 * 512 * 3 * 64 * 4 * 30
    assert check_tail_pool(8, 3, 64, 30, 141 * 2**30) == tail_pool_bytes(8, 3, 64, 30)
    # Qwen3-8B-like: 36 layers x 8 heads x 128 with 1024 rows would need 72 GiB
    with pytest.raises(ValueError, match=r"--max-num-seqs \d+ or less"):
        check_tail_pool(1024, 8, 128, 36, 80 * 2**30)


@pytest.mark.parametrize("env,msg", [
    ({"KAKEYA_KBITS": "3"}, "KAKEYA_KBITS is not a Kakeya setting \\(did you mean KAKEYA_K_BITS\\?"),
    ({"KAKEYA_BOUNDARY_LAYERS": "0"}, "did you mean KAKEYA_BOUNDARY_SKIP_LAYERS"),
    ({"KAKEYA_ZZZ": "1"}, "KAKEYA_ZZZ is not a Kakeya setting"),
])
def test_misspelt_setting_names_are_refused(env, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        settings(30, env)
    assert "\n" not in str(e.value) and "unset" in str(e.value)


def test_every_name_the_code_and_recipes_use_is_known():
    """The known-name list cannot drift: every KAKEYA_* variable read through the environment anywhere in the
    repo, and every variable a recipe sets, is accepted."""
    known = known_env_names()
    read = set()
    for p in ROOT.rglob("*.py"):
        if not any(part.startswith(".") for part in p.relative_to(ROOT).parts):
            read |= set(re.findall(r"(?:environ|env)(?:\.get\(|\[)\s*[\"'](KAKEYA_[A-Z0-9_]+)", p.read_text()))
    for p in (ROOT / "deploy" / "recipes").glob("*.env"):
        read |= set(re.findall(r"^(KAKEYA_[A-Z0-9_]+)=", p.read_text(), re.M))
    assert {"KAKEYA_FORMAT", "KAKEYA_K_BITS", "KAKEYA_CALIBRATION"} <= read
    assert read <= known, sorted(read - known)
    settings(30, {n: "" for n in known})      # all known names together, empty = defaults


def test_calibration_path_is_resolved_and_checked(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=f"resolved to {re.escape(str(missing))}\\) is not a directory"):
        settings(30, {"KAKEYA_CALIBRATION": str(missing)})
    (tmp_path / "bundle").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = settings(30, {"KAKEYA_CALIBRATION": "./bundle/../bundle"})
    assert cfg.calibration == str(tmp_path.resolve() / "bundle")     # every process sees one absolute folder
    with pytest.raises(ConfigError, match="no effect with KAKEYA_FORMAT=exact"):
        settings(30, {"KAKEYA_CALIBRATION": "bundle", "KAKEYA_FORMAT": "exact"})


def test_unsupported_model_selection_is_one_actionable_line():
    check_selection([])
    for reasons, word in ((["MLA not supported"], "MLA"), (["sliding window not supported"], "sliding window"),
                          (["attention type encoder_only not supported", "head_size not supported"], "encoder_only"),
                          (["dtype not supported"], "bf16")):
        with pytest.raises(ValueError, match=word) as e:
            check_selection(reasons)
        assert "\n" not in str(e.value) and "--attention-backend" in str(e.value)


GEOM = dict(num_layers=2, num_kv_heads=1, head_dim=64)


@pytest.fixture
def small_bundle(tmp_path):
    tables = {"k_table.b3": torch.linspace(-2, 2, 8), "v_table.b2": torch.linspace(-1, 1, 4),
              "k_weight.0": torch.ones(1, 64)}
    return write_bundle(tmp_path / "bundle", tables, dict(format="kakeya", **GEOM))


def test_bundle_must_hold_the_served_widths(small_bundle):
    load_bundle(small_bundle, k_bits=(3,), v_bits=(2,), **GEOM)
    with pytest.raises(BundleError, match=r"no k_table.b4 \(it has widths \[3\]\).*unset KAKEYA_CALIBRATION"):
        load_bundle(small_bundle, k_bits=(4,), v_bits=(2,), **GEOM)
    with pytest.raises(BundleError, match="no v_table.b3"):
        load_bundle(small_bundle, k_bits=(3,), v_bits=(3,), **GEOM)


def test_bundle_files_may_not_link_out_of_the_folder(small_bundle, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / TENSORS).write_bytes((small_bundle / TENSORS).read_bytes())
    (small_bundle / TENSORS).unlink()
    (small_bundle / TENSORS).symlink_to(other / TENSORS)
    with pytest.raises(BundleError, match="outside the bundle folder"):
        load_bundle(small_bundle, **GEOM)


@pytest.mark.parametrize("damage,msg", [
    ("list", "must hold a JSON object"), ("huge", "not a manifest"), ("name", "unknown tensor 'q_table.b3'"),
    ("nan", "ascending finite"),
])
def test_malformed_bundle_contents_are_refused(tmp_path, damage, msg):
    tensors = {"k_table.b3": torch.linspace(-2, 2, 8)}
    if damage == "name":
        tensors["q_table.b3"] = torch.linspace(-2, 2, 8)
    if damage == "nan":
        tensors["k_table.b3"][-1] = float("nan")
    b = write_bundle(tmp_path / "b", tensors, dict(format="kakeya", **GEOM))
    if damage == "list":
        (b / MANIFEST).write_text(json.dumps([1, 2]))
    if damage == "huge":
        (b / MANIFEST).write_text(" " * (1 << 21) + "{}")
    with pytest.raises(BundleError, match=msg) as e:
        load_bundle(b, **GEOM)
    assert "\n" not in str(e.value)


# Runtime = the vLLM plugin package and everything it imports from this repo (lazy imports included).
_PACKAGES = {"kakeya_kv": ROOT / "kakeya_kv", "kakeya_kernels": ROOT / "kernels",
             "kakeya_calibration": ROOT / "calibration", "kakeya_v1_3_ppl": ROOT / "vllm_backend" / "kakeya_v1_3_ppl"}
_NETWORK_MODULES = {"socket", "ssl", "urllib", "http", "requests", "httpx", "aiohttp", "huggingface_hub", "ftplib",
                    "smtplib", "websockets", "subprocess"}
_NETWORK_CALLS = {"from_pretrained", "hf_hub_download", "snapshot_download", "urlopen"}


def _module_file(name: str) -> Path | None:
    top, *rest = name.split(".")
    if top not in _PACKAGES:
        return None
    base = _PACKAGES[top].joinpath(*rest)
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _runtime_files() -> set[Path]:
    todo = sorted(_PACKAGES["kakeya_v1_3_ppl"].glob("*.py"))
    seen: set[Path] = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        pkg = [k for k, v in _PACKAGES.items() if v in p.parents][0]
        sub = p.parent.relative_to(_PACKAGES[pkg]).parts
        for node in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    mod = ".".join([pkg, *sub[:len(sub) - node.level + 1], *([mod] if mod else [])])
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            todo += [f for f in map(_module_file, names) if f is not None and f not in seen]
    return seen


def test_runtime_has_no_network_path():
    files = _runtime_files()
    assert _PACKAGES["kakeya_calibration"] / "bundle.py" in files and _PACKAGES["kakeya_kv"] / "config.py" in files
    assert _PACKAGES["kakeya_kv"] / "data.py" not in files      # the CPU harness's downloader stays out
    hits = []
    for p in sorted(files):
        for node in ast.walk(ast.parse(p.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            hits += [f"{p.relative_to(ROOT)}:{node.lineno} imports {m}" for m in mods
                     if m.split(".")[0] in _NETWORK_MODULES]
            if isinstance(node, ast.Attribute) and node.attr in _NETWORK_CALLS:
                hits.append(f"{p.relative_to(ROOT)}:{node.lineno} calls {node.attr}")
    assert not hits, "\n".join(hits)


def test_additional_config_sets_the_same_knobs(monkeypatch):
    from kakeya_v1_3_ppl import checks
    ac = {"kakeya": {"k_bits": 3, "KAKEYA_V_BITS": "2", "boundary_skip_layers": [0, 1], "cuda_graphs": False}}
    assert checks.additional_env(ac) == {"KAKEYA_K_BITS": "3", "KAKEYA_V_BITS": "2",
                                         "KAKEYA_BOUNDARY_SKIP_LAYERS": "0,1", "KAKEYA_CUDA_GRAPHS": "0"}
    assert checks.additional_env({}) == {} and checks.additional_env({"other": 1}) == {}
    with pytest.raises(ConfigError, match="did you mean KAKEYA_K_BITS"):
        checks.additional_env({"kakeya": {"kbits": 3}})
    with pytest.raises(ConfigError, match="expected an object"):
        checks.additional_env({"kakeya": "k3v2"})
    env = {"KAKEYA_K_BITS": "4"}
    with pytest.raises(ConfigError, match="in the environment but '3' in --additional-config"):
        checks.apply_additional_config(ac, env)
    env = {"KAKEYA_K_BITS": "3"}
    checks.apply_additional_config(ac, env)          # same value twice is fine
    assert env["KAKEYA_BOUNDARY_SKIP_LAYERS"] == "0,1"
    # settings() applies the config of the engine being built (into os.environ), then validates as usual.
    for k in list(os.environ):
        if k.startswith("KAKEYA_"):
            monkeypatch.delenv(k)
    try:
        monkeypatch.setattr(checks, "_current_additional_config", lambda: {"kakeya": {"k_bits": 3, "v_bits": 2}})
        cfg = checks.settings(num_layers=30)
        assert (cfg.k_bits, cfg.v_bits) == (3, 2) and os.environ["KAKEYA_K_BITS"] == "3"
        for k in ("KAKEYA_K_BITS", "KAKEYA_V_BITS"):
            os.environ.pop(k)
        monkeypatch.setattr(checks, "_current_additional_config", lambda: {"kakeya": {"k_bits": 9}})
        with pytest.raises(ConfigError, match="KAKEYA_K_BITS"):
            checks.settings(num_layers=30)
    finally:
        for k in ("KAKEYA_K_BITS", "KAKEYA_V_BITS"):
            os.environ.pop(k, None)

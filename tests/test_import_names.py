"""Guard: the repo's directories must not shadow other distributions' import names.

`kernels/` holds our Triton code (imported as `kakeya_kernels`), but `kernels` is also Hugging Face's package,
which transformers >= 5.2x imports (`from kernels import ...`). Python puts the working directory first on
sys.path for `python -m ...` and `python -m pytest`, so a `kernels/__init__.py` at the repo root made every
transformers model load run from the repo root fail (seen 2026-12-07: ImportError CUDAProperties)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_repo_kernels_dir_is_not_a_regular_package():
    assert not (ROOT / "kernels" / "__init__.py").exists(), \
        "kernels/__init__.py would shadow Hugging Face's `kernels` from the repo root; keep kernels/ a namespace dir"


def test_import_kernels_from_repo_root_is_not_ours():
    # Run where a user runs the tools: cwd = repo root, cwd first on sys.path (python -c).
    code = ("import importlib.util, json; s = importlib.util.find_spec('kernels'); "
            "print(json.dumps(None if s is None else s.origin))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    origin = out.strip().strip('"')
    assert not origin.startswith(str(ROOT / "kernels")), f"`import kernels` resolves to our directory: {origin}"


def test_our_kernels_still_import():
    import kakeya_kernels.kakeya_triton  # noqa: F401  (namespace package mapped to kernels/)
    import kakeya_kernels.variants  # noqa: F401

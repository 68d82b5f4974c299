"""The GPU image's Triton on the CPU (KAKEYA_DEVICE_TRITON): session 9's prefill launches compiled for sm_90 with this
machine's Triton 3.9 but not with the H200's 3.6 (torch 2.11 pins triton==3.6.0), so every configuration the GPU
session launches is compiled with that version too when a copy is installed (`pip install --no-deps --target DIR
triton==3.6.0`; CI has none: skipped)."""
import pytest

from kakeya_kv.config import ConfigError, device_triton


def test_device_triton_setting_is_validated(tmp_path):
    from kakeya_v1_3_ppl.checks import known_env_names
    assert device_triton({}) is None and device_triton({"KAKEYA_DEVICE_TRITON": " "}) is None
    with pytest.raises(ConfigError, match=r"KAKEYA_DEVICE_TRITON='.*nope': .* holds no triton package; make it with "
                                          r"`pip install --no-deps --target DIR triton==3.6.0`") as e:
        device_triton({"KAKEYA_DEVICE_TRITON": str(tmp_path / "nope")})
    assert "\n" not in str(e.value)
    (tmp_path / "tri" / "triton").mkdir(parents=True)
    (tmp_path / "tri" / "triton" / "__init__.py").write_text("")
    assert device_triton({"KAKEYA_DEVICE_TRITON": str(tmp_path / "tri" / ".." / "tri")}) == (tmp_path / "tri").resolve()
    assert "KAKEYA_DEVICE_TRITON" in known_env_names()


def test_every_gpu_configuration_compiles_with_the_device_triton():
    """compile_check.py --device-triton --v13: the parity suite's and the bench's decode launches (baseline, TUNED,
    every candidate), the prefill candidates at the parity tests' widths, the seal and combine kernels and the v13
    kernels, compiled for sm_90 by the GPU image's Triton in a child process (~5-10 min on 2 CPU cores)."""
    from tests.test_kernel_bench import _sm90_run
    path = device_triton()
    if path is None:
        pytest.skip("KAKEYA_DEVICE_TRITON unset (a folder with the GPU image's Triton)")
    p = _sm90_run(["compile_check.py", "--device-triton", "--v13"], "ptxas", timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "configurations compile for sm_90 with Triton" in p.stdout and f"({path})" in p.stdout, p.stdout[-1000:]

"""Guard: the tracked tree stays small (a submission over the size limit is refused whole)."""
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE = 4 * 1024 * 1024      # no tracked file above 4 MiB: generate data, don't commit it
MAX_TOTAL = 24 * 1024 * 1024    # device calls carry the tree plus ~58 MB of vLLM kit within 64 MiB


def _tracked():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (FileNotFoundError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_tracked_files_are_small():
    files = [p for p in _tracked() if p.is_file()]
    big = [(str(p.relative_to(ROOT)), p.stat().st_size) for p in files if p.stat().st_size > MAX_FILE]
    assert not big, f"tracked files over {MAX_FILE} bytes: {big}"
    total = sum(p.stat().st_size for p in files)
    assert total <= MAX_TOTAL, f"tracked tree is {total} bytes (> {MAX_TOTAL})"


def test_device_job_scripts_name_existing_files():
    """A device call is scarce: every test module, script and Python file a device job names must exist here."""
    import re
    root = Path(__file__).resolve().parents[1]
    jobs = sorted(root.glob("benchmarks/**/*.sh")) + sorted(root.glob("scripts/*.sh"))
    missing = []
    for job in jobs:
        for path in set(re.findall(r"(?<![\w/.$])((?:tests|benchmarks|scripts)/[\w/.-]+\.(?:py|sh))", job.read_text())):
            if not (root / path).exists():
                missing.append(f"{job.relative_to(root)} -> {path}")
    assert jobs and not missing, missing

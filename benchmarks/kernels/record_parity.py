"""Run the kernel parity suite (pytest, GPU cases included) and record the result with the card name.

python benchmarks/kernels/record_parity.py OUT_JSON [--timeout S] [--files F ...] [--merge EARLIER.json]
With --timeout the suite is stopped after S seconds and the tests finished so far are recorded
(from pytest's verbose lines), with "timed_out": true. --files runs only those test files (to resume a cut run where it
stopped); --merge adds an earlier record's cases that this run did not repeat (same card required: a parity record is
one card's), so two short calls give one record.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import torch


def from_junit(path):
    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if tc.find(tag) is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
        cases.append({"test": f"{tc.get('classname')}::{tc.get('name')}", "outcome": outcome,
                      "time_s": float(tc.get("time"))})
    return cases


def from_verbose(text):
    return [{"test": m.group(1), "outcome": m.group(2).lower()}
            for m in re.finditer(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", text, re.M)]


FILES = ["tests/test_kernels.py", "tests/test_decode_variants.py", "tests/test_decode_candidates.py",
         "tests/test_prefill_variants.py", "tests/test_scratch_prefill.py",
         # the default's K-score path (int8 MMAs on uniform-grid K), its grid, tails read from pages
         "tests/test_ki8_decode.py", "tests/test_uniform_grid.py", "tests/test_linear_decode.py",
         "tests/test_tailpages.py"]


def merge(cases, earlier_path, gpu):
    """Earlier cases not rerun now; refuses a record from another card (parity is per card)."""
    with open(earlier_path) as f:
        old = json.load(f)
    if old.get("gpu") != gpu:
        raise SystemExit(f"--merge: {earlier_path} was recorded on {old.get('gpu')!r}, this run is on {gpu!r}")
    seen = {c["test"] for c in cases}
    return [dict(c, from_earlier_run=True) for c in old["tests"] if c["test"] not in seen] + cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--timeout", type=float)
    ap.add_argument("--files", nargs="+", default=FILES)
    ap.add_argument("--merge")
    a = ap.parse_args()
    unknown = [f for f in a.files if not os.path.exists(f)]
    if unknown:
        raise SystemExit(f"--files: no such test file {unknown}")
    timed_out = False
    with tempfile.TemporaryDirectory() as td:
        xml = os.path.join(td, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *a.files, f"--junitxml={xml}"]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            rc, text = p.returncode, p.stdout
        except subprocess.TimeoutExpired as e:
            timed_out, rc = True, None
            text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        cases = from_junit(xml) if os.path.exists(xml) else from_verbose(text)
    print("\n".join(text.splitlines()[-20:]))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (TRITON_INTERPRET=1)"
    if a.merge:
        cases = merge(cases, a.merge, gpu)
    res = {"gpu": gpu, "files": a.files, "merged_from": a.merge,
           "torch": torch.__version__, "pytest_exit": rc, "timed_out": timed_out,
           "passed": sum(c["outcome"] == "passed" for c in cases),
           "failed": sum(c["outcome"] in ("failed", "error") for c in cases),
           "skipped": sum(c["outcome"] == "skipped" for c in cases), "tests": cases}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "tests"}))
    sys.exit(1 if timed_out else rc)


if __name__ == "__main__":
    main()

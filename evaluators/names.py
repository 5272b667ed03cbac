"""The hint that follows an unknown name (an lm-eval task, an evaluator): its closest known names."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """" Did you mean 'a' or 'b'?" for up to three close names; "" when none is close."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""

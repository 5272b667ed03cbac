"""Keep this machine out of what is published: find local paths in text, and the spec as it
may be shown to others (local teacher and data paths replaced by a placeholder).

    find_local_paths("model=/home/me/runs/x")       # ["/home/me/runs/x"]
    portable_spec_yaml(spec_text, {"./teacher": "the teacher"})

A card or an uploaded file naming `/home/me/runs/stages/distill-.../model` tells readers
nothing they can use and tells everyone the layout of the builder's machine.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

# An absolute path: a "/" that starts a word (not inside a URL, repo id "org/name", "tok/s",
# "6/2"), followed by a name; "~/" paths; and "./" or "../" relative paths.
_LOCAL_PATH = re.compile(r"(?<![\w.:/~\-])(?:~|\.\.?)?/[\w.\-+@%]+(?:/[\w.\-+@%]*)*")
PLACEHOLDER = "<local path, not published>"


def find_local_paths(text: str, known: Iterable[str] = ()) -> list[str]:
    """Every local-looking path in `text`, plus any of the `known` local folders it contains."""
    found = [match.group(0) for match in _LOCAL_PATH.finditer(text)]
    found += [path for path in known if path and path in text]
    return found


def portable_spec_yaml(spec_yaml: str, local_references: Mapping[str, str]) -> str:
    """The spec text with each local reference (path -> what it is) replaced by a placeholder
    that names what to put there, and any other local path (a comment, say) by PLACEHOLDER.

    Replacement is textual, so the spec keeps its comments and layout."""
    text = spec_yaml
    for path in sorted(local_references, key=len, reverse=True):  # longest first: /a/b before /a
        text = text.replace(path, f"<local path to {local_references[path]}, not published>")
    return _LOCAL_PATH.sub(PLACEHOLDER, text)

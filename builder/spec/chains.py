"""Chained members: a student may name another student as its parent (`from:`), which it is
pruned from and taught by, as NVIDIA derived 12B -> 9B -> 7B and 9B -> 4B.

Plain names in, plain names out (no spec models), so the schema, the planner and the report
share one reading of the chains. `parents` maps each student's name to its parent's name, or
None for a student of the family's teacher.
"""
from __future__ import annotations

import difflib


def chain_problems(parents: dict[str, str | None], budgets: set[str]) -> list[str]:
    """Every parent that is unknown, the student itself, given by a budget, or part of a cycle;
    `budgets`: the students given by `params` or a serving `budget`, whose shape is chosen only during the build."""
    problems = []
    for index, (name, parent) in enumerate(parents.items()):
        field = f"students[{index}].from"
        if parent is None:
            continue
        if parent == name:
            problems.append(f"{field}: student {name!r} names itself as its parent; name another student, or "
                            "remove `from` to prune it from the teacher")
        elif parent not in parents:
            problems.append(f"{field}: {parent!r} is no student of this family{_did_you_mean(parent, parents)}; "
                            f"name one of {sorted(parents)}, or remove `from` to prune it from the teacher")
        elif parent in budgets:
            problems.append(f"{field}: {parent!r} is given by a budget (`params` or `budget`), whose shape its search "
                            f"picks only while the family builds, after {name!r}'s stages are planned; give "
                            f"{parent!r} an explicit `shape` (report.md names the shape its search chose), or "
                            "chain from another student")
    return problems + [_cycle_problem(cycle, parents) for cycle in cycles(parents)]


def _did_you_mean(name: str, parents: dict[str, str | None]) -> str:
    close = difflib.get_close_matches(name, list(parents), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _cycle_problem(cycle: list[str], parents: dict[str, str | None]) -> str:
    index = list(parents).index(cycle[0])
    loop = " -> ".join(cycle + cycle[:1])
    return (f"students[{index}].from: the students {loop} each name the next as their parent, a cycle that never "
            "reaches the teacher; remove `from` from one of them, so that the chain starts at the teacher")


def cycles(parents: dict[str, str | None]) -> list[list[str]]:
    """Each cycle once, from its first student in spec order (a student naming itself aside)."""
    found, seen = [], set()
    for name in parents:
        path = []
        while name in parents and name not in seen and name not in path:
            path.append(name)
            name = parents[name]
        if name in path and len(path) - path.index(name) > 1:
            loop = path[path.index(name):]
            found.append(loop)
        seen.update(path)
    return found


def chain(parents: dict[str, str | None], name: str) -> list[str]:
    """The student's lineage from the first student of its chain down to itself."""
    lineage = [name]
    while parents.get(lineage[0]) is not None:
        lineage.insert(0, parents[lineage[0]])
    return lineage


def chain_order(parents: dict[str, str | None]) -> list[str]:
    """Every student after its parent, otherwise in spec order (the planner lays out a
    parent's stages before its children's read them)."""
    return sorted(parents, key=lambda name: len(chain(parents, name)))

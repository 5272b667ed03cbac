"""The stage kinds: one module per kind, each with one descriptor (`KIND`, a
builder.stages.base.StageKind: name, code version, run function, resources, optional,
resumable, estimate, description, report record and card section), listed once in `registry.STAGE_KINDS`.

A stage function is a plain function from a StageContext to (summary, tokens processed): it
reads its upstream stages' manifests, writes only inside `ctx.out_dir`, and returns a
JSON-able summary that becomes its manifest. The runner decides where and when it runs
(Ray tasks); stage functions never import Ray themselves (the coordinating ones call the Ray
Train or actor runner of their kind of work).

The version bump rule: bump a kind's `version` (any new string) in the commit that changes
what it writes for the same inputs: its outputs' values, files, or the meaning of its summary,
including through code it calls (builder.training for correct/distill, evaluators/ for
evaluate/throughput; a change to shared code bumps every kind whose output changes).
Refactors, speed-ups and logging need no bump. Hand-kept versions rather than a hash of each
stage's source: the code a stage runs spans modules shared by several stages, so a source hash
would either miss a change to a callee or recompute every stage for a comment.

Adding a stage kind:
1. `builder/stages/<kind>.py`: its `run(ctx)`, its `estimate` (a builder.planning.cost_model
   `Work`) when it computes, and `KIND = StageKind(...)`;
2. one line in `builder/stages/registry.py`;
3. its place in the plan: `dag.add("<kind>", label, section, inputs)` in builder/planning/dag.py;
4. its spec section, if it has settings: a `Strict` model in builder/spec/schema.py and a field
   of FamilySpec (execution-only fields marked, so they stay out of its hash);
5. its report record: a class in builder/report/records.py (`KIND.record`), filled by
   builder/report/family_report.py and shown by a section of publish/card.py (`KIND.card_section`).
tests/test_house.py checks that every kind is registered, versioned and described.
"""

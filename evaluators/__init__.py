"""What measures a model: lm-eval benchmarks (lm_eval_runner, over the offline tasks of
offline_tasks), held-out perplexity (perplexity) and vLLM generation throughput (throughput, in
vllm_worker subprocesses). Each is an `evaluators.base.Evaluator`, found by name in
`evaluators.registry`:

    run(model, settings, device) -> record     # a ModelHandle, typed frozen settings, "cpu"/"cuda"
    estimate(settings, model_config, costs, seq_len) -> builder.planning.cost_model.Work

The evaluate stage hands lm-eval and perplexity one ModelHandle, so they share one load of the
model; the throughput stage gives vLLM only the checkpoint's path. A quantized variant's evaluate
stage runs the same evaluators in a vLLM worker (in_vllm), on a handle whose `engine` is "vllm":
they share one engine (vllm_engine); an evaluator that can run there checks `model.engine` and
is listed in in_vllm.SERVED_BY_VLLM.

Adding an evaluator:
1. `evaluators/<name>.py`: a frozen settings dataclass and an `Evaluator` subclass with `name`,
   `settings_type`, `run` (its docstring lists the record's keys) and `estimate`. Heavy
   libraries are imported where it runs, not at the top (lm_eval_runner imports lm-eval inside
   its functions): the dry run imports every evaluator it estimates.
2. One line in `evaluators/registry.py`: `"<name>": "evaluators.<name>:<Class>"`.
3. `tests/test_<name>.py` for its numbers, and its example settings in tests/test_evaluators.py
   (`EXAMPLE_SETTINGS`: that test checks every registered evaluator against the interface).
For a build to run it: its settings in a spec section (builder/spec/schema.py), an entry in the
stage that runs it (`_evaluations` in builder/stages/evaluate.py: its record goes into the
manifest under its key), that stage's version bumped (its summary changes), and for the report
and the card, builder/report/records.py, builder/report/family_report.py and publish/card.py.
"""

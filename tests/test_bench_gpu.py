"""bench.gpu's judging, on a CPU (no GPU was ever lent to run the bench itself): its real-shape
family plans on the embedded teacher, and a build's manifests are judged as the step judges
them: a stage off CUDA, or a training, evaluate, score or teach stage over the estimate's per-GPU
memory, fails it."""
from __future__ import annotations

import json
from pathlib import Path

from bench.gpu_real_shape import SPEC, layout_flags, memory_against_estimate, predicted_memory
from bench.gpu_steps import stages_not_on_cuda


def _spec(tmp_path: Path) -> Path:
    spec = tmp_path / "gpu-real-shape.yaml"
    spec.write_text(SPEC)
    return spec


def _finish(stages: Path, stage_id: str, kind: str, placement: dict | None, steps: int = 4) -> None:
    folder = stages / stage_id
    folder.mkdir(parents=True)
    summary = {"steps": steps, **({"placement": placement} if placement else {})}
    (folder / "manifest.json").write_text(json.dumps({"stage": kind, "summary": summary}))


def test_the_real_shape_family_plans_stages_the_estimate_sizes(tmp_path):
    one, two = (predicted_memory(_spec(tmp_path), tmp_path / "runs", layout_flags(gpus)) for gpus in (1, 2))
    assert one.keys() == two.keys()
    (distill,) = [stage for stage in one if stage.startswith("distill-")]  # the one student's
    assert sorted(stage.split("-")[1] for stage in one if stage.startswith("evaluate-")) == ["teacher", "width"]
    assert [stage.split("-")[0] for stage in one if stage.startswith(("score-", "teach-"))] == ["score", "teach"]
    assert two[distill] < one[distill]  # FSDP2 over two GPUs shards the student, and halves the micro-batch


def test_a_stage_off_cuda_or_a_sized_stage_over_its_prediction_fails_the_step(tmp_path):
    spec = _spec(tmp_path)
    predicted = predicted_memory(spec, tmp_path / "runs", layout_flags(1))
    (distill,) = [stage for stage in predicted if stage.startswith("distill-")]
    (evaluate,) = [stage for stage in predicted if stage.startswith("evaluate-width-")]
    (teach,) = [stage for stage in predicted if stage.startswith("teach-")]
    (score,) = [stage for stage in predicted if stage.startswith("score-")]
    stages = tmp_path / "runs" / "stages"
    cuda = {"device": "cuda:0", "dtype": "bfloat16", "node": "gpu-1 (10.0.0.1)"}
    _finish(stages, distill, "distill", cuda | {"peak_memory_bytes": int(predicted[distill] * 1.1)})
    _finish(stages, evaluate, "evaluate", cuda | {"peak_memory_bytes": int(predicted[evaluate] * 0.9)})
    _finish(stages, teach, "teach", cuda | {"peak_memory_bytes": int(predicted[teach] * 1.1)})
    _finish(stages, score, "score", {"device": "cpu", "dtype": "float32", "node": "gpu-1 (10.0.0.1)",
                                     "peak_memory_bytes": int(predicted[score] * 0.9)})
    _finish(stages, "prune-width-0", "prune", None)  # computes nothing on a GPU: not judged
    _finish(stages, "throughput-0", "throughput", cuda | {"peak_memory_bytes": 10})
    placements, off_cuda = stages_not_on_cuda(stages)
    assert set(placements) == {distill, evaluate, teach, score, "throughput-0"} and off_cuda == [score]
    checks = memory_against_estimate(spec, tmp_path / "runs", layout_flags(1), stages)
    assert checks[distill]["within"] is False and checks[distill]["predicted"] == predicted[distill]
    assert checks[evaluate]["within"] is True and checks[score]["within"] is True
    assert checks[teach]["within"] is False  # judged as an evaluation is: the peak at most the prediction
    assert checks["throughput-0"] == {"peak": 10}  # recorded, not judged: the estimate does not size it

"""What a stage is: a node of the plan (`Stage`), what its function receives (`StageContext`)
and returns (`StageResult`), and the one descriptor of each stage kind (`StageKind`) that the
planner, the runner, the estimate, the console and the report read.

Nothing here imports torch or Ray: the CLI plans and describes a build without either.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, TypeVar

from pydantic import BaseModel

from builder.options.run_options import RunOptions
from builder.planning.cost_model import Costs, StageInputs, Work
from builder.spec.schema import FamilySpec
from builder.store.stage_store import Manifest, StageKey

Section = TypeVar("Section", bound=BaseModel)
# options["engine"] of a stage whose model vLLM serves (a quantized variant's evaluate stage):
# hashed, so it is never confused with a transformers evaluation of the same model
VLLM_ENGINE = "vllm"

# How a stage is placed (builder.running.runner):
#   light         a fraction of a CPU in a reused worker: file work, coordination (acquire, prune, select)
#   heavy         the per-stage CPUs (and GPUs) in a fresh worker process, so its models' memory
#                 goes back to the OS when it ends (score, evaluate, throughput)
#   coordinating  its task holds nothing: the CPUs and GPUs go to the actors it starts (teach)
#   training      coordinating on --train-workers Ray Train workers (correct, distill); with one
#                 worker its loop runs in its own task, placed as a heavy one holding that worker's
#                 CPUs and GPU (builder.training.ray_train says why)
Resources = Literal["light", "heavy", "coordinating", "training"]


@dataclass(frozen=True)
class Stage:
    """One node of the DAG. `inputs` maps a role (e.g. "teacher") to an upstream stage id."""

    key: StageKey
    inputs: dict[str, str] = field(default_factory=dict)
    student: str | None = None  # the student this stage belongs to, if any

    @property
    def id(self) -> str:
        return self.key.dirname

    @property
    def name(self) -> str:
        return self.key.stage


@dataclass(frozen=True)
class StageContext:
    stage: Stage
    spec: FamilySpec
    options: RunOptions
    out_dir: Path
    inputs: dict[str, Manifest]  # role -> finished upstream stage

    def model_dir(self, role: str) -> Path:
        return Path(self.inputs[role].summary["model_dir"])

    def blocks_path(self) -> Path:
        return Path(self.inputs["data"].summary["blocks"])

    @property
    def config(self) -> dict:
        """The settings this stage's result depends on: what its hash covers."""
        return self.stage.key.config

    def section(self, model: type[Section]) -> Section:
        """The spec section this stage was planned with, execution-only fields included."""
        return model.model_validate({**self.stage.key.config, **self.stage.key.execution})

    @property
    def precision(self) -> str:
        """The training precision the planner resolved and hashed (never re-resolved here)."""
        return self.stage.key.options["precision"]


StageResult = tuple[dict, int]  # (summary, tokens processed)
WorkEstimate = Callable[[dict, dict, StageInputs, Costs, int], Work]  # (config, execution, inputs, costs, seq_len)


@dataclass(frozen=True)
class StageKind:
    """Everything minizoo knows about one kind of stage, in one place.

    name       the stage's name in folders, hashes, the console and the report ("distill")
    version    its code version, part of every stage hash (the bump rule: builder.stages)
    run        the stage function: StageContext -> (summary, tokens processed)
    resources  light / heavy / coordinating / training (see Resources)
    title      what it does, in words (the dry run's legend, `status`)
    optional   a failure is recorded in the report; the rest of the family still builds
    resumable  a killed run resumes from its checkpoints instead of starting over
    estimate   its work for the dry-run estimate (builder.planning.estimate); None: file work only
    planned_tokens  the tokens the dry run shows for it, from the spec and the planned stage
    record     the builder.report.records class that holds its results in report.json
    card_section  the publish.card function that shows that record in a model card
    """

    name: str
    version: str
    run: Callable[[StageContext], StageResult]
    resources: Resources
    title: str
    optional: bool = False
    resumable: bool = False
    estimate: WorkEstimate | None = None
    planned_tokens: Callable[[FamilySpec, Stage], int | None] = lambda spec, stage: None
    record: str = "StageCost"
    card_section: str = "_compute_section"

    @property
    def uses_workers(self) -> bool:
        """Runs on --train-workers Ray Train workers or actors (the coordinating and training stages)."""
        return self.resources in ("coordinating", "training")

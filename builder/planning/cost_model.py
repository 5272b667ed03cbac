"""The estimate's arithmetic: FLOPs, bytes, memory and the stated costs, per unit of work.

Each stage kind's `estimate` (builder.stages) turns its settings into a `Work` with these;
builder.planning.estimate adds them up for a plan and prints them.

    estimate = estimate_plan(plan, teacher_config, RunOptions(gpu="h100", mfu=0.4, train_workers=8))
    print("\n".join(render_estimate(estimate)))

FLOPs are analytic (PaLM appendix B: matmuls only, 2 per multiply-add, attention over the full
sequence): a forward pass costs `forward_flops_per_token` per token, a training step three
forwards' worth for the trained model (forward + backward), and distillation adds the frozen
teacher's forward. lm-eval's tokens come from a table of the known tasks (documents x
requests x tokens, measured with lm-eval's own request building).

A stage's wall time is what it physically does, so it holds for a 135M demo on a CPU and for
an 8B family on GPUs alike: start-up (a process, a Ray Train worker group, lm-eval's tasks, a
vLLM engine), reading its checkpoints (bytes on disk / disk bandwidth, each worker its own
copy side by side), compute (FLOPs / (GPUs x bf16 peak x MFU)) and writing (training
checkpoints every `checkpoint_every` steps, the final model, a stored teacher signal). Every
constant is in `Costs` with its source and is printed with the estimate; the MFU (`--mfu`)
and the disk bandwidth (`--disk-gbps`) are overridable. GPU-hours count the whole wall time
of every GPU a stage holds.

Memory per GPU of a training stage, for DDP and for FSDP, as builder.training runs them
(student state sharded by FSDP, the frozen teacher replicated or sharded by
builder.models.teacher_sharding's rule): fp32 master weights, fp32 gradients and AdamW's two fp32
moments (16 bytes per trained parameter), the frozen teacher in the training dtype,
activations of one micro-batch (the tensors autograd keeps per layer, counted below; with
activation checkpointing, `--activation-checkpointing`, only each layer's input plus one
layer recomputed), the logits (student in the compute dtype, its fp32 gradient buffer, the
teacher's: builder.training materialises full logits and chunks only the loss) and what the
parallelism adds (DDP's gradient buckets, FSDP's all-gathered groups). bench/memory.py
checks it against measured peaks on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from builder.models.arch import count_params
from builder.models.teacher_sharding import teacher_is_sharded
from builder.options.run_options import RunOptions
from builder.spec.shape import Shape

GIB = 2**30


MEMORY_HEADROOM = 0.9  # CUDA context, allocator fragmentation and NCCL buffers take the rest


@dataclass(frozen=True)
class Accelerator:
    name: str
    bf16_tflops: float  # dense bf16 tensor-core peak, from the vendor's data sheet
    memory_gib: float


ACCELERATORS = {
    "h100": Accelerator("NVIDIA H100 SXM 80GB", 989.0, 80),
    "h200": Accelerator("NVIDIA H200 SXM 141GB", 989.0, 141),
    "a100": Accelerator("NVIDIA A100 SXM 80GB", 312.0, 80),
    "l40s": Accelerator("NVIDIA L40S 48GB", 362.0, 48),
}


def forward_flops_per_token(config, seq_len: int) -> int:
    """Matmul FLOPs of one forward pass per token, LM head and attention included."""
    shape = Shape.of(config)
    h, d, layers = shape.hidden_size, shape.head_dim, shape.num_hidden_layers
    q_width, kv_width = shape.num_attention_heads * d, shape.num_key_value_heads * d
    layer_params = h * q_width + 2 * h * kv_width + q_width * h + 3 * h * shape.intermediate_size
    lm_head = h * config.vocab_size
    attention = 4 * layers * q_width * seq_len  # Q K^T and scores x V, 2 FLOPs per multiply-add
    return 2 * (layers * layer_params + lm_head) + attention


def kd_flops_per_token(teacher_config, student_config, seq_len: int) -> dict:
    teacher = forward_flops_per_token(teacher_config, seq_len)
    student = forward_flops_per_token(student_config, seq_len)
    return {"teacher_forward": teacher, "student_forward": student, "total": teacher + 3 * student}


def activation_bytes_per_token_layer(config, compute_bytes: int = 2, residual_bytes: int = 4) -> int:
    """Bytes autograd keeps per token in one decoder layer: the two norms' inputs and their fp32
    normalisation (the residual stream: fp32 under autocast over fp32 weights, bf16 when FSDP
    computes in bf16 parameters), and in the compute dtype the normed inputs of attention and
    MLP, q/k/v, the attention output, and the MLP's gate, up and gated product (SDPA/flash
    attention keeps no seq x seq scores)."""
    shape = Shape.of(config)
    q_width, kv_width = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    compute = compute_bytes * (2 * shape.hidden_size + q_width + 2 * kv_width + q_width + 3 * shape.intermediate_size)
    return compute + 2 * residual_bytes * shape.hidden_size


def inference_bytes_per_token_layer(config, compute_bytes: int) -> int:
    """Bytes per token one decoder layer holds at its peak in a forward without gradients, where
    nothing is kept for a backward and each tensor goes once the next is made (transformers'
    Llama-family layers): the residual stream and the normed input, beside the larger of
    attention (q, k, v, the rotary copies of q and k, k and v repeated to the query heads for
    grouped-query attention, the output) and the MLP (`down_proj(act_fn(gate_proj(x)) *
    up_proj(x))`: the activated gate, the up projection and their product)."""
    shape = Shape.of(config)
    q_width, kv_width = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    attention = 4 * q_width + 3 * kv_width
    mlp = 3 * shape.intermediate_size
    return compute_bytes * (2 * shape.hidden_size + max(attention, mlp))


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes per device of one training stage under one parallelism (`total`: with activation
    checkpointing when `checkpointing`; `total_checkpointed`: with it, whatever the setting)."""

    parallel: str
    weights: float
    gradients: float
    optimizer: float
    teacher: float
    activations: float
    activations_checkpointed: float
    logits: float
    communication: float = 0.0  # DDP's gradient buckets, or FSDP's unsharded (all-gathered) groups
    checkpointing: bool = False
    teacher_sharded: bool = False

    @property
    def total(self) -> float:
        kept = self.activations_checkpointed if self.checkpointing else self.activations
        return self.weights + self.gradients + self.optimizer + self.teacher + self.communication + kept + self.logits

    @property
    def total_checkpointed(self) -> float:
        return replace(self, checkpointing=True).total


def training_memory(trained_config, frozen_config, micro_batch: int, seq_len: int, workers: int,
                    parallel: str, *, checkpointing: bool = False, dtype: str = "bfloat16",
                    device_bytes: float | None = None) -> TrainingMemory:
    """`frozen_config` None: teacher correction (the teacher itself trains, no frozen model).
    `dtype`: the training precision (bf16: autocast, and FSDP's bf16 parameter policy);
    `device_bytes`: one device's memory, for the teacher's placement rule
    (builder.models.teacher_sharding; None: replicated)."""
    trained, compute = count_params(trained_config), DTYPE_BYTES[dtype]
    sharded = parallel == "fsdp" and workers > 1
    shard = workers if sharded else 1
    tokens = micro_batch * seq_len
    shape = Shape.of(trained_config)
    # builder.training.parallel: FSDP casts parameters to bf16, so the residual stream is bf16
    # too; DDP keeps fp32 weights, so autocast's residual additions stay fp32.
    residual = compute if sharded else 4
    per_layer = activation_bytes_per_token_layer(trained_config, compute, residual) * tokens
    logits_per_token = (compute + 4 + (compute if frozen_config is not None else 0)) * trained_config.vocab_size
    teacher, teacher_sharded = _teacher_bytes(frozen_config, dtype, workers, parallel, device_bytes)
    return TrainingMemory(
        parallel=parallel, weights=4 * trained / shard, gradients=4 * trained / shard, optimizer=8 * trained / shard,
        teacher=teacher, activations=shape.num_hidden_layers * per_layer,
        # checkpointing keeps each layer's input (the residual stream) and recomputes one layer
        activations_checkpointed=shape.num_hidden_layers * residual * shape.hidden_size * tokens + per_layer,
        logits=logits_per_token * tokens,
        communication=_communication_bytes(trained_config, workers, parallel, compute),
        checkpointing=checkpointing, teacher_sharded=teacher_sharded)


@dataclass(frozen=True)
class ForwardMemory:
    """Bytes on one device of a forward pass without gradients over one batch (an evaluation):
    the model's weights, what one decoder layer holds at its peak (inference_bytes_per_token_layer:
    no autograd keeps any layer's tensors), and the logits held at once. Beyond a plain
    forward, what its pass holds `held` beside the layers' tensors (the score stage's hook
    copies and statistics) and `after` them, once they are freed, beside the logits (the teach
    pass's top-k chunks and outputs, the LM loss's log-softmax): the larger phase counts."""

    weights: float
    activations: float
    logits: float
    held: float = 0.0
    after: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.logits + self.held + max(self.activations, self.after)


def forward_memory(config, dtype: str, batch_tokens: float, logits_bytes: float, *, held: float = 0.0,
                   after: float = 0.0) -> ForwardMemory:
    """`batch_tokens`: the positions one forward runs (batch x length); `logits_bytes`: what
    the caller holds of the logits at once (its own rule: chunks, or the whole batch);
    `held`, `after`: what else its pass holds during the forward and after it (ForwardMemory)."""
    compute = DTYPE_BYTES[dtype]
    layer = inference_bytes_per_token_layer(config, compute)
    return ForwardMemory(compute * count_params(config), layer * batch_tokens, logits_bytes, held, after)


def _teacher_bytes(frozen_config, dtype: str, workers: int, parallel: str,
                   device_bytes: float | None) -> tuple[float, bool]:
    if frozen_config is None:
        return 0.0, False
    whole = DTYPE_BYTES[dtype] * count_params(frozen_config)
    if device_bytes is not None and teacher_is_sharded(whole, device_bytes, parallel, workers):
        return whole / workers + _gathered_groups(frozen_config, DTYPE_BYTES[dtype]), True
    return whole, False


def _communication_bytes(trained_config, workers: int, parallel: str, compute_bytes: int) -> float:
    """DDP copies every gradient into its all-reduce buckets (gradient_as_bucket_view is off):
    4 more bytes per parameter. FSDP2 holds unsharded, in the compute dtype: the root group
    (embeddings, final norm, LM head: not resharded between forward and backward) and the
    layer being computed plus the one prefetched, and the gradients of the same before they
    are reduce-scattered. One process (no process group) wraps nothing."""
    if workers == 1:
        return 0.0
    if parallel == "ddp":
        return 4.0 * count_params(trained_config)
    return 2 * _gathered_groups(trained_config, compute_bytes)


def _gathered_groups(config, compute_bytes: int) -> float:
    layers = Shape.of(config).num_hidden_layers
    per_layer = (count_params(config) - _root_params(config)) / layers
    return compute_bytes * (_root_params(config) + 2 * per_layer)


def _root_params(config) -> int:
    """Embeddings (and an untied LM head) and the final norm: FSDP's root group."""
    hidden = Shape.of(config).hidden_size
    heads = 1 if getattr(config, "tie_word_embeddings", False) else 2
    return heads * config.vocab_size * hidden + hidden


@dataclass(frozen=True)
class Costs:
    """The fixed and I/O costs the wall time adds to compute. Printed with every estimate
    (`notes`); bench/estimate.py checks them against one real build's stage times."""

    # GB/s (1e9 bytes) each worker reads and the work directory takes in writes. 1: what one
    # client of a shared file system (NFS, a cloud filestore) sustains; node-local NVMe does
    # 2-7 (--disk-gbps). bench.estimate times this machine's disk.
    read_gbps: float = 1.0
    write_gbps: float = 1.0
    # A stage's set-up in its Ray worker: transformers' first model instantiation in a process
    # (an assumed value: no current result file holds a measurement). The worker's imports of
    # torch and transformers are paid once per worker process, before a stage's clock (its
    # manifest's wall_s) starts, and are not counted.
    stage_start_s: float = 5.0
    # A Ray Train worker group (correct, distill) or the teach pass's actors: worker processes,
    # torch.distributed, imports, the result's return: a manifest's wall_s minus the loop's own
    # wall_seconds (an assumed value: no current result file holds a measurement). GPUs add a
    # CUDA context and NCCL set-up. With one worker the loop runs in the stage's own task, no
    # group to start (builder.training.ray_train): there the same value over-counts its start.
    train_start_s: float = 20.0
    # lm-eval: importing it, its TaskManager and building the first task, then each (sub)task's
    # documents and requests (assumed values: no current result file holds a measurement).
    lm_eval_start_s: float = 12.0
    lm_eval_task_s: float = 0.5
    # A vLLM engine per measured model: engine_start_s of the demo's three throughput runs
    # (bench/results/demo.json: 64, 47, 43 s on a 2-core CPU). On GPUs, CUDA graph capture
    # and the model's load replace the CPU's set-up: expect the same order.
    vllm_start_s: float = 47.0

    def with_options(self, options: RunOptions) -> "Costs":
        if options.disk_gbps is None:
            return self
        return replace(self, read_gbps=options.disk_gbps, write_gbps=options.disk_gbps)

    def notes(self) -> list[str]:
        return [f"disk {self.read_gbps:g} GB/s read per worker, {self.write_gbps:g} GB/s written (1 is one client of a "
                "shared file system, node-local NVMe does 2-7; --disk-gbps sets both)",
                f"start-up: {self.stage_start_s:g} s per stage, {self.train_start_s:g} s per Ray Train worker "
                f"group or teach pass, lm-eval {self.lm_eval_start_s:g} s + {self.lm_eval_task_s:g} s per task, "
                f"{self.vllm_start_s:g} s per vLLM engine (the vLLM figure from demo.json's 2-core CPU run, the "
                "others assumed; builder.planning.cost_model.Costs)",
                f"a training checkpoint writes {CHECKPOINT_BYTES_PER_PARAM} bytes per trained parameter (fp32 weights "
                "and AdamW's two moments) every checkpoint_every steps; the final model: a corrected teacher in "
                f"the teacher's dtype, a distilled one counted at {STORED_BYTES_PER_PARAM} bytes (fp32, a search "
                "candidate's; a student's, in the teacher's dtype, takes less)"]


COSTS = Costs()


# builder.training.checkpoints saves get_state_dict(model, optimizer): the fp32 model (it is
# the master copy; bf16 is autocast only) and AdamW's exp_avg and exp_avg_sq in fp32.
CHECKPOINT_BYTES_PER_PARAM = 12


# A model that training starts from is saved in fp32, its master weights: a pruned student, and
# a search candidate's light distillation (the chosen student's distillation continues from it).
# What is evaluated and published (a corrected teacher, a student's distillation) is saved in
# the teacher's dtype (builder.stages.training_run.final_dtype): config_dtype_bytes.
STORED_BYTES_PER_PARAM = 4


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class TaskCost:
    """What lm-eval forwards for one task: `docs` documents over `subtasks` tasks (lm-eval's
    limit applies to each), `requests` forward passes per document (one per choice; choices
    of one token after a shared context are computed once), `tokens` per forward at
    zero-shot, plus `tokens_per_shot` for each few-shot example."""

    docs: int
    requests: float
    tokens: float
    tokens_per_shot: float
    subtasks: int = 1


# From lm-eval 0.4's own request building (`python -m bench.estimate --tasks`, its result file
# bench/results/estimate_tasks.json: tests/test_estimate.py holds these entries to it;
# simple_evaluate with a model that only records its requests; 40 documents a task, 57 x 40 for
# MMLU; at zero shots and at the few-shot count of families/llama-3.1-8b-minitron.yaml or 5/25)
# on the bundled tasks (evaluators/tasks) with SmolLM2's tokenizer; other tokenizers differ by
# some 10-20%. boolq and lambada_openai:
# zero-shot only, a shot taken as long as a request. truthfulqa_mc2 and gsm8k are not bundled:
# stated from their lm-eval YAMLs (six fixed QA pairs before each question; five worked
# examples of about 180 tokens, ~130 generated), not measured.
LM_EVAL_TASKS = {
    "hellaswag": TaskCost(10042, 4.0, 41.8, 81.3),
    "arc_easy": TaskCost(2376, 3.33, 30.7, 33.8),
    "arc_challenge": TaskCost(1172, 3.95, 43.8, 38.5),
    "piqa": TaskCost(1838, 2.0, 36.7, 39.2),
    "winogrande": TaskCost(1267, 2.0, 22.4, 24.7),
    "mmlu": TaskCost(14042, 1.0, 112.5, 103.8, subtasks=57),
    "boolq": TaskCost(3270, 1.0, 154.6, 154.6),
    "lambada_openai": TaskCost(5153, 1.0, 77.7, 77.7),
    "truthfulqa_mc2": TaskCost(817, 7.0, 210.0, 35.0),
    "gsm8k": TaskCost(1319, 1.0, 190.0, 180.0),
}


UNKNOWN_TASK = TaskCost(1000, 4.0, 50.0, 100.0)  # a multiple-choice task of typical size


def lm_eval_tokens(task: dict) -> tuple[int, int]:
    """(tokens, tokens per forward pass) of one evaluation task entry {name, num_fewshot, limit}."""
    cost = LM_EVAL_TASKS.get(task["name"], UNKNOWN_TASK)
    per_subtask = cost.docs / cost.subtasks
    docs = cost.subtasks * min(task.get("limit") or per_subtask, per_subtask)
    length = cost.tokens + task.get("num_fewshot", 0) * cost.tokens_per_shot
    return round(docs * cost.requests * length), round(length)


# The longest request lm-eval forwards for a task (context and continuation less the last token:
# the length HFLM pads a batch to) among its first N documents (lm-eval's limit takes the first
# ones; for MMLU, the first N of every subject): ((N, tokens), ..., (every document, tokens)). At
# zero shots on the bundled tasks with SmolLM2's tokenizer, from lm-eval's own request building:
# bench/results/estimate_longest.json (`bench.estimate --longest`). Far from the typical length
# over a whole split (MMLU 9x, boolq 8x): a batch is as long as its longest request.
LM_EVAL_LONGEST: dict[str, tuple[tuple[int, int], ...]] = {
    "hellaswag": ((10, 60), (16, 60), (20, 60), (50, 91), (100, 91), (200, 95), (500, 102), (1000, 113), (2000, 124),
                  (5000, 145), (10042, 154)),
    "arc_easy": ((10, 34), (16, 41), (20, 58), (50, 73), (100, 76), (200, 162), (500, 162), (1000, 162), (2000, 162),
                 (2376, 162)),
    "arc_challenge": ((10, 81), (16, 81), (20, 81), (50, 81), (100, 89), (200, 89), (500, 174), (1000, 174),
                      (1172, 174)),
    "piqa": ((10, 65), (16, 65), (20, 65), (50, 133), (100, 133), (200, 171), (500, 241), (1000, 241), (1838, 241)),
    "winogrande": ((10, 26), (16, 29), (20, 29), (50, 38), (100, 38), (200, 38), (500, 38), (1000, 38), (1267, 38)),
    "mmlu": ((10, 1033), (16, 1033), (20, 1033), (50, 1033), (100, 1044), (200, 1044), (500, 1044), (1000, 1044),
             (1534, 1044)),
    "boolq": ((10, 286), (16, 286), (20, 286), (50, 312), (100, 784), (200, 784), (500, 784), (1000, 784),
              (2000, 784), (3270, 1298)),
    "lambada_openai": ((10, 106), (16, 106), (20, 111), (50, 111), (100, 111), (200, 153), (500, 153), (1000, 153),
                       (2000, 221), (5000, 221), (5153, 221)),
}
# A task without a table (truthfulqa_mc2, gsm8k, any other): its longest request taken as this
# many times its typical one, the most the measured tasks' whole splits reach (MMLU: 9.3x).
LONGEST_OVER_TYPICAL = 10.0


def lm_eval_longest(task: dict) -> int:
    """Tokens of the longest request of one task entry {name, num_fewshot, limit}: what lm-eval
    pads a batch to at most. HFLM's _loglikelihood_tokens (lm_eval/models/huggingface.py) sorts
    the requests longest first (its `_collate`) and pads each batch to its longest
    (`padding_len_inp`, `pad_and_concat`): the first batch is as long as the longest request, not
    as LM_EVAL_TASKS' typical one. LM_EVAL_LONGEST's at the fewest documents >= limit (an upper
    bound); each shot adds the task's typical tokens_per_shot."""
    cost = LM_EVAL_TASKS.get(task["name"], UNKNOWN_TASK)
    shots = task.get("num_fewshot", 0) * cost.tokens_per_shot
    table = LM_EVAL_LONGEST.get(task["name"])
    if table is None:
        return round(LONGEST_OVER_TYPICAL * cost.tokens + shots)
    limit = task.get("limit") or table[-1][0]
    return round(next((tokens for docs, tokens in table if docs >= limit), table[-1][1]) + shots)


@dataclass(frozen=True)
class Disk:
    """Bytes a stage's folder holds: `peak` at once while it runs, `kept` once it finished."""

    peak: float = 0.0
    kept: float = 0.0


@dataclass(frozen=True)
class Work:
    """What one stage does, in the units its wall time follows from, and the disk it takes."""

    tokens: int = 0
    flops: float = 0.0
    start_s: float = 0.0
    read_bytes: float = 0.0  # per worker: workers read their copies side by side
    write_bytes: float = 0.0  # in all
    split_read_bytes: float = 0.0  # in all, each worker reading its own part (a stored signal)
    checkpoints: int = 0
    memory_of: object = None  # (micro_batch, workers, parallel, **how) -> TrainingMemory, for training stages
    forward_memory_of: object = None  # dtype -> ForwardMemory: evaluations, score and teach (no gradients)
    disk: Disk = Disk()  # its folder's bytes (logs and small results aside: builder.store.disk_space)


def one_after_another(works: list[Work], start_s: float, read_bytes: float) -> Work:
    """The works one stage does in turn (its evaluators'), added up after the stage's own
    start-up (`start_s`) and the checkpoints it reads (`read_bytes`)."""
    return Work(sum(work.tokens for work in works), sum(work.flops for work in works),
                start_s + sum(work.start_s for work in works), read_bytes,
                forward_memory_of=_largest_forward([work.forward_memory_of for work in works if work.forward_memory_of]))


def _largest_forward(memories_of: list):
    """dtype -> the largest of the works' ForwardMemory (they run one after another on one
    model), or None when none has one."""
    if not memories_of:
        return None
    return lambda dtype: max((memory_of(dtype) for memory_of in memories_of), key=lambda memory: memory.total)


class StageInputs:
    """A stage's input models: their configs and the bytes their checkpoints take on disk.
    `producers`: role -> the kind of the stage that made that input ("acquire-teacher", ...)."""

    def __init__(self, label: str, producers: dict[str, str], models: dict, teacher_config):
        self.producers, self.models, self.teacher_config = producers, models, teacher_config
        # the stage's own model; a variant's label is its model's with ".<scheme>" added (builder.planning.dag)
        self.model = models.get(label or "teacher") or models.get(label.rpartition(".")[0], teacher_config)

    def config(self, role: str):
        """"student", "model": the stage's own; a throughput stage's variant role ("<model>.<scheme>"): its model's."""
        if role in self.models or self.producers.get(role) != "quantize":
            return self.models.get(role, self.model)
        return self.models.get(role.rpartition(".")[0], self.teacher_config)

    def stored_bytes(self, role: str) -> float:
        """An acquired or corrected teacher and a distilled student are stored in the teacher's
        dtype (bf16 for most Hub models); a pruned one (and a search candidate, which select
        hands on) in fp32. A search candidate's own evaluation counts its read in the teacher's
        dtype too: its fp32 read is a small part of that stage. A quantized variant is counted at
        the teacher's dtype too, a bound: its Linear weights take fewer bytes."""
        in_teacher_dtype = self.producers[role] in ("acquire-teacher", "correct", "distill", "quantize")
        per_param = config_dtype_bytes(self.teacher_config) if in_teacher_dtype else STORED_BYTES_PER_PARAM
        return per_param * count_params(self.config(role))

    def measured(self) -> list[str]:
        """The roles of a throughput stage: the models it measures."""
        return [role for role in self.producers if role in self.models or self.producers[role] == "quantize"]


def config_dtype_bytes(config) -> int:
    """Bytes per parameter in the dtype a config declares; float32 where it declares none, as
    from_pretrained assumes and builder.models.loading.declared_dtype reads it."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return DTYPE_BYTES.get(str(dtype).removeprefix("torch."), 2)


def subtasks(tasks: list[dict]) -> int:
    return sum(LM_EVAL_TASKS.get(task["name"], UNKNOWN_TASK).subtasks for task in tasks)


def trained_tokens(config: dict, execution: dict, seq_len: int) -> tuple[int, int]:
    """(tokens, checkpoints) of a training run: whole steps of the global batch
    (builder.training TrainSettings.steps), a checkpoint every `checkpoint_every` steps but
    the last (builder.training.loop writes the final model instead)."""
    per_step = config["global_batch_size"] * seq_len
    steps = max(1, -(-config["tokens"] // per_step))
    return steps * per_step, (steps - 1) // execution["checkpoint_every"]


def training_writes(trained_config, checkpoints: int, model_bytes_per_param: int = STORED_BYTES_PER_PARAM) -> float:
    """Its checkpoints and its final model (`model_bytes_per_param`: the dtype it is stored in)."""
    return checkpoints * checkpoint_bytes(trained_config) + model_bytes_per_param * count_params(trained_config)


def checkpoint_bytes(trained_config) -> float:
    """One training checkpoint: CHECKPOINT_BYTES_PER_PARAM per parameter, and the tied LM head
    once more in fp32 (the model's state dict names a tied tensor twice and DCP writes both;
    SmolLM2-135M's is 28M parameters, 7% of its checkpoint). DCP's framing of each tensor
    (about 2 kB) is left to the stage's log room (builder.store.disk_space.LOG_ROOM_BYTES)."""
    tied = trained_config.vocab_size * Shape.of(trained_config).hidden_size \
        if getattr(trained_config, "tie_word_embeddings", False) else 0
    return CHECKPOINT_BYTES_PER_PARAM * count_params(trained_config) + STORED_BYTES_PER_PARAM * tied


def training_disk(trained_config, checkpoints: int, model_bytes_per_param: int = STORED_BYTES_PER_PARAM) -> Disk:
    """A training stage's folder (builder.training.checkpoints): a checkpoint is written beside
    the one before, which is removed only then, so from the second on two are on disk at once;
    the final model (`model_bytes_per_param`: its stored dtype) is written beside the last
    checkpoint, which stays (resumable state)."""
    checkpoint, model = checkpoint_bytes(trained_config), model_bytes_per_param * count_params(trained_config)
    last = min(checkpoints, 1) * checkpoint
    return Disk(peak=max(min(checkpoints, 2) * checkpoint, last + model), kept=last + model)


def stored_model_disk(config, bytes_per_param: int = STORED_BYTES_PER_PARAM) -> Disk:
    """A stage that writes one model (prune in fp32, acquire-teacher as stored)."""
    size = bytes_per_param * count_params(config)
    return Disk(peak=size, kept=size)


def signal_bytes(tokens: int, config: dict, vocab_size: int) -> float:
    # torch: only when a stored signal is sized
    from builder.teaching.signal import stored_bytes

    return stored_bytes(tokens, config["top_k"], vocab_size, config["tail_samples"])


def memory_of(trained, frozen, seq_len: int):
    """(micro_batch, workers, parallel, **training_memory's keywords) -> TrainingMemory."""
    return lambda micro_batch, workers, parallel, **how: training_memory(trained, frozen, micro_batch, seq_len,
                                                                         workers, parallel, **how)

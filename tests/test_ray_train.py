"""Distillation on Ray Train: 2 CPU workers (DDP over gloo) on a local loopback cluster.

Run: .venv/bin/pytest tests/test_ray_train.py -q   (about 40 s on 2 idle cores)
"""
from __future__ import annotations

import dataclasses

import pickle
import shutil
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

import builder.training.ray_train
from builder.models.loading import load_model
from builder.options.run_options import RunOptions
from builder.training.loop import distill
from builder.training.settings import TrainSettings, TrainingDiverged
from builder.training.ray_train import run_on_ray_train, run_training, worker_nodes
from block_files import write_blocks
from builder.spec.schema import DistillSpec
from builder.stages.training_run import train_settings
from tiny_models import TINY_VOCAB, save_tiny_checkpoint

SEQ_LEN, STEPS, EVERY = 32, 6, 4
# Ray Train's controller imports ray.data, whose config warns about its own deprecations.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")


@pytest.fixture(scope="module")
def cluster():
    # Started the way builds start theirs (builder.running.ray_session.init_ray): loopback
    # only, a temp dir of its own, and a dashboard of its own. Ray Train's placement-group
    # cleaner asks the State API whether the controller lives, at the dashboard address
    # its cluster registered; with include_dashboard=False that was the default port 8265,
    # where another test's cluster answered "no such actor", and the cleaner removed this
    # run's placement group, killing its workers mid-training (CI, stop 25).
    from ray_instance import local_ray

    with local_ray(RunOptions(local_cpus=2, train_workers=2)):  # a build training on 2 workers starts a dashboard
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return save_tiny_checkpoint(root / "teacher", seed=0), save_tiny_checkpoint(root / "student", seed=1)


SECTION = DistillSpec(tokens=STEPS * 4 * SEQ_LEN, global_batch_size=4, checkpoint_every=EVERY,
                      learning_rate=3e-3, warmup_steps=2)


def settings(workers: int) -> TrainSettings:
    # The spec's global batch split as a build splits it: 4 sequences per step in one
    # process, 2 per worker on 2 workers; the same steps over the same data.
    return train_settings(SECTION, workers, "float32")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each 1-CPU Ray worker; the shared machine is busy
    yield
    torch.set_num_threads(threads)


def test_ray_train_resumes_a_checkpoint_and_matches_one_process(cluster, models, tmp_path, one_thread):
    blocks = torch.randint(3, TINY_VOCAB, (40, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    write_blocks(tmp_path / "data", blocks)
    single = distill(*models, blocks, tmp_path / "single", settings(workers=1))
    # Ray starts from the single-process run's step-4 checkpoint: its global batch and
    # data positions are the same, so it must finish where that run finished.
    shutil.copytree(tmp_path / "single" / "checkpoints", tmp_path / "ray" / "checkpoints")

    result = run_on_ray_train("distill", *models, tmp_path / "data", tmp_path / "ray",
                              settings(workers=2), num_workers=2, use_gpu=False)  # fmt: skip

    assert (result.start_step, result.steps, result.tokens_seen) == (EVERY, STEPS, single.tokens_seen)
    assert result.final_loss == pytest.approx(single.final_loss, rel=1e-4)
    assert_same_weights(tmp_path / "ray" / "model", tmp_path / "single" / "model")
    placed = [worker["placement"] for worker in worker_nodes(tmp_path / "ray")]  # each worker placed itself
    assert [(p["device"], p["dtype"]) for p in placed] == [("cpu", "float32")] * 2


def test_fsdp_on_two_workers_matches_one_process_and_resumes_on_one(cluster, models, tmp_path, one_thread):
    blocks = torch.randint(3, TINY_VOCAB, (40, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    write_blocks(tmp_path / "data", blocks)
    single = distill(*models, blocks, tmp_path / "single", settings(workers=1))
    result = run_on_ray_train("distill", *models, tmp_path / "data", tmp_path / "fsdp",
                              dataclasses.replace(settings(workers=2), max_shard_size="100KB"), num_workers=2, use_gpu=False,
                              parallel="fsdp")
    assert (result.steps, result.tokens_seen) == (STEPS, single.tokens_seen)
    assert result.final_loss == pytest.approx(single.final_loss, rel=1e-4)
    assert_same_weights(tmp_path / "fsdp" / "model", tmp_path / "single" / "model")
    assert len(list((tmp_path / "fsdp" / "model").glob("model-*-of-*.safetensors"))) > 1

    # Its step-4 checkpoint holds each rank's shards; one process loads them re-sharded
    # (DCP) and finishes the run where the single-process run finished.
    shutil.copytree(tmp_path / "fsdp" / "checkpoints", tmp_path / "one" / "checkpoints")
    resumed = distill(*models, tmp_path / "data", tmp_path / "one", settings(workers=1))
    assert resumed.start_step == EVERY
    assert resumed.final_loss == pytest.approx(single.final_loss, rel=1e-4)
    assert_same_weights(tmp_path / "one" / "model", tmp_path / "single" / "model")


def test_a_local_instance_for_ray_train_runs_a_dashboard(cluster):
    """Ray Train's placement-group cleaner asks the dashboard's state API whether the
    controller lives; a build with --train-workers above 1 starts one (ray_session)."""
    from ray_instance import state_api_running

    assert state_api_running()


def test_one_worker_trains_in_the_calling_process_without_a_ray_train_group(cluster, models, tmp_path, one_thread):
    """A group of one has nobody to synchronise with: run_training runs the loop where it is
    called (a stage's own task), records that process as rank 0, and matches one process."""
    blocks = torch.randint(3, TINY_VOCAB, (40, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    write_blocks(tmp_path / "data", blocks)
    single = distill(*models, blocks, tmp_path / "single", settings(workers=1))
    result = run_training("distill", *models, tmp_path / "data", tmp_path / "here", settings(workers=1), num_workers=1)
    assert (result.steps, result.tokens_seen) == (STEPS, single.tokens_seen)
    assert result.final_loss == single.final_loss  # the same loop on the same data in one process: bit for bit
    assert_same_weights(tmp_path / "here" / "model", tmp_path / "single" / "model")
    [worker] = worker_nodes(tmp_path / "here")
    assert (worker["rank"], worker["node_id"]) == (0, ray.get_runtime_context().get_node_id())
    assert not (tmp_path / "here" / "ray_train" / "distill").exists()  # no Ray Train run was started


def assert_same_weights(trained: Path, reference: Path) -> None:
    """Loadable as a plain HF checkpoint, with the student's tokenizer; the weights match the
    single-process run up to the order of the collectives' float sums."""
    loaded = load_model(trained, torch.device("cpu"), torch.float32, trainable=False)
    expected = load_file(str(reference / "model.safetensors"))
    for name, tensor in loaded.state_dict().items():
        if name in expected:
            torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5)
    assert (trained / "tokenizer.json").exists()


def test_arguments_are_checked_before_any_worker_starts(models, tmp_path):
    with pytest.raises(ValueError, match="needs student_dir"):
        run_on_ray_train("distill", models[0], None, tmp_path / "b", tmp_path, settings(2))
    with pytest.raises(ValueError, match="kind='prune'"):
        run_on_ray_train("prune", *models, tmp_path / "b", tmp_path, settings(2))


class FailingTrainer:
    def __init__(self, failures: dict[int, Exception]):
        self.failures = failures

    def fit(self):
        raise ray.train.WorkerGroupError("workers failed", self.failures)


def test_a_worker_divergence_reaches_the_caller_as_itself():
    diverged = pickle.loads(pickle.dumps(TrainingDiverged(7, "the loss", float("nan"), "lower it")))
    assert (diverged.step, str(diverged)) == (7, "training diverged at step 7: the loss is nan; lower it")
    trainer = FailingTrainer({1: RuntimeError("gloo hung up"), 0: diverged})
    with pytest.raises(TrainingDiverged, match="step 7"):
        builder.training.ray_train._fit(trainer)
    with pytest.raises(ray.train.WorkerGroupError):  # anything else stays Ray's error
        builder.training.ray_train._fit(FailingTrainer({0: RuntimeError("out of memory")}))

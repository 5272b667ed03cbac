"""A full disk (issue 22, item 1): a stage checks the free space its outputs need before it
writes, a disk that fills anyway becomes one message naming the path, the space needed and
free and what to do (exit 1, no traceback), partial temporaries are removed, and a failed
build's family view cannot crash the driver.

No disk is filled: `shutil.disk_usage` is replaced where the free space is read, ENOSPC is
raised inside torch.distributed.checkpoint's writer, and torch.save's C++ writer meets a
real ENOSPC by writing to /dev/full.
"""
from __future__ import annotations

import errno
import io
import logging
import pickle
import stat
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from ray.train import WorkerGroupError
from rich.console import Console

from builder.cli import main
from builder.family import load_and_plan
from builder.options.run_options import RunOptions
from builder.models.loading import load_model
from builder.models.teacher import config_from_json
from builder.planning.cost_model import checkpoint_bytes, trained_tokens, training_disk
from builder.planning.estimate import FamilyEstimate
from builder.running.console import BuildConsole
from builder.stages import acquire_teacher
from builder.stages.execute import execute_stage
from builder.store import disk_space
from builder.store.disk_space import LOG_ROOM_BYTES, DiskFull, as_disk_full, space_checked
from builder.store.stage_store import StageStore
from builder.training import checkpoints
from builder.training.checkpoints import save_checkpoint
from builder.training.loop import distill
from builder.training.parallel import World
from builder.training.settings import TrainSettings
from builder.units import format_bytes
from test_checkpoints import PLAN, trainee
from test_failed_build_view import failed_rebuild_of
from test_report import checkpoint, family, finish  # noqa: F401 (fixtures)
from tiny_models import TINY_VOCAB, one_thread, save_tiny_checkpoint  # noqa: F401 (autouse fixture)

Usage = namedtuple("Usage", "total used free")
ONE_WORLD = World(0, 1, False)


@pytest.fixture(autouse=True)
def own_log_handlers(monkeypatch):
    """main's logging.basicConfig binds a handler to the stderr of the first test calling it;
    each test here gets its own, so a warning never goes to an earlier test's closed stream."""
    monkeypatch.setattr(logging.root, "handlers", [])


def free_space(monkeypatch, free: int) -> None:
    """The disk, as the pre-check and the messages read it, has `free` bytes left."""
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - free, free))


def no_partial_files(folder: Path) -> bool:
    return not [path for path in folder.rglob("*") if disk_space.is_partial(path.name)]


# --- before a stage writes ----------------------------------------------------------------


def test_a_stage_short_of_space_fails_before_it_writes_naming_path_needed_and_free(family, monkeypatch):
    spec, options, plan = family
    stage = plan.stages[plan.original_teacher_stage]
    ran = []
    monkeypatch.setattr(acquire_teacher, "acquire_teacher", lambda *args: ran.append(args))
    free_space(monkeypatch, 5 * 10**6)
    with pytest.raises(DiskFull) as caught:
        execute_stage(stage, plan.spec, options, {}, disk_bytes=2 * 10**9)
    out_dir = StageStore(options.workdir).path(stage.key)
    message = str(caught.value)
    assert ran == [] and StageStore(options.workdir).manifest(stage.key) is None
    assert f"disk full at {out_dir}: stage {stage.id} needs {format_bytes(2 * 10**9 + LOG_ROOM_BYTES)}" in message
    assert f"{format_bytes(5 * 10**6)} is free" in message and "run the same command again" in message
    assert caught.value.errno == errno.ENOSPC


def test_a_resumed_stage_needs_only_what_its_folder_does_not_hold_yet(tmp_path, monkeypatch):
    held = tmp_path / "checkpoints" / "step-000010" / "shard.distcp"
    held.parent.mkdir(parents=True)
    held.write_bytes(b"\0" * 300_000)
    peak = 1_000_000
    free_space(monkeypatch, peak - 300_000 + LOG_ROOM_BYTES)  # exactly what is still needed
    with space_checked(tmp_path, peak, "stage distill-x"):
        pass
    free_space(monkeypatch, peak - 300_000 + LOG_ROOM_BYTES - 1)
    with pytest.raises(DiskFull, match="needs"):
        with space_checked(tmp_path, peak, "stage distill-x"):
            pass


def test_a_killed_runs_temporaries_are_removed_before_the_check(tmp_path, monkeypatch):
    stale = tmp_path / "checkpoints" / ".tmp-step-000020"
    stale.mkdir(parents=True)
    (stale / "__0_0.distcp").write_bytes(b"\0" * 1000)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "shard-00001.npy.tmp").write_bytes(b"\0")
    free_space(monkeypatch, 10**12)
    with space_checked(tmp_path, 0, "stage distill-x"):
        assert no_partial_files(tmp_path) and (tmp_path / "model").is_dir()


# --- a disk that fills while a stage writes -------------------------------------------------------


@pytest.fixture
def trained(tmp_path):
    """A tiny model, its optimizer and scheduler, in one process, and its stage folder."""
    model_dir = save_tiny_checkpoint(tmp_path / "model", num_hidden_layers=2)
    return (*trainee(model_dir, ONE_WORLD), tmp_path / "distill-x")


def save(trained, step: int) -> None:
    model, optimizer, scheduler, out = trained
    save_checkpoint(out, model, optimizer, scheduler, ONE_WORLD, PLAN, {"step": step, "loss": 1.0, "samples": 8})


def framing_bytes(model) -> int:
    """What a checkpoint holds beyond its tensors' bytes: DCP frames each tensor it writes
    (about 2 kB; 4 kB allowed) and lists it in .metadata; the RNG and trainer state are a few kB."""
    state = model.state_dict()  # a tied tensor under both its names, as DCP writes it
    tensors = len(state) + 3 * len(list(model.parameters()))  # AdamW: step, exp_avg, exp_avg_sq each
    return 4096 * tensors + 64 * 1024


def test_a_checkpoints_size_is_the_estimates(trained):
    save(trained, 2)
    model, _, _, out = trained
    written = sum(f.stat().st_size for f in (out / "checkpoints" / "step-000002").iterdir())
    estimated = checkpoint_bytes(model.config)
    assert model.config.tie_word_embeddings  # the tiny model ties its LM head: counted once more
    assert estimated <= written <= estimated + framing_bytes(model)


def test_enospc_in_dcps_writer_is_one_message_and_leaves_no_partial_checkpoint(trained, monkeypatch):
    save(trained, 2)  # the checkpoint before: it stays, and is the resume point
    out = trained[-1]
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_filesystem, "_write_item", disk_full)
    free_space(monkeypatch, 10**12)  # the check before passes; the disk fills while writing
    with pytest.raises(DiskFull) as caught:
        with space_checked(out, 4 * 10**6, "stage distill-x"):
            save(trained, 4)
    assert [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()] == ["step-000002"]
    assert no_partial_files(out) and (out / "checkpoints" / "latest").read_text() == "step-000002"
    message = str(caught.value)
    assert message.startswith(f"disk full at {out}: stage distill-x needs ") and " is free" in message
    assert "disk filled while it wrote" in message  # there is room now: other writers took it


def dev_full() -> str:
    """The device every write to fails with ENOSPC: a real full disk, for one file."""
    device = Path("/dev/full")
    if not (device.exists() and stat.S_ISCHR(device.stat().st_mode)):  # never write to a regular file there
        pytest.skip("no /dev/full device on this system: nothing to write a real ENOSPC to")
    return str(device)


def test_a_real_enospc_under_torch_save_is_a_disk_full(trained, monkeypatch):
    monkeypatch.setattr(checkpoints, "_rng_file", lambda rank: dev_full())  # the RNG state meets a full disk
    free_space(monkeypatch, 10**12)
    with pytest.raises(DiskFull, match="disk filled while it wrote") as caught:
        with space_checked(trained[-1], 10**6, "stage distill-x"):
            save(trained, 2)
    assert "unexpected pos" in "".join(map(str, disk_space._causes(caught.value.__cause__)))  # torch's own words
    assert no_partial_files(trained[-1])


def test_torchs_short_write_without_an_errno_is_a_disk_full_only_when_the_disk_is_short(trained, monkeypatch):
    # torch.save given a path writes with its C++ writer, which reports a failed write as
    # "unexpected pos" with no errno: a full disk only if the disk lacks what the stage needs.
    monkeypatch.setattr(checkpoints, "_save", lambda path, obj: torch.save(obj, str(path)))
    monkeypatch.setattr(checkpoints, "_rng_file", lambda rank: dev_full())
    out = trained[-1]
    free_space(monkeypatch, 10**12)
    with pytest.raises(RuntimeError, match="unexpected pos") as plenty:  # room on the disk: another fault
        with space_checked(out, 10**6, "stage distill-x"):
            save(trained, 2)
    assert not isinstance(plenty.value, DiskFull) and no_partial_files(out)
    with pytest.raises(DiskFull, match=f"needs {format_bytes(10**9 + LOG_ROOM_BYTES)}, 1 MB is free"):
        with space_checked(out, 10**9, "stage distill-x"):
            free_space(monkeypatch, 10**6)  # the disk is now short of what the stage needs
            save(trained, 2)
    assert no_partial_files(out)


def test_a_full_disk_inside_a_ray_train_worker_is_found_and_crosses_to_the_driver(tmp_path):
    failure = WorkerGroupError("rank 1 failed", {0: ValueError("fine"), 1: OSError(errno.ENOSPC, "No space left")})
    full = as_disk_full(failure, tmp_path, 10**6, "stage distill-x")
    assert isinstance(full, DiskFull) and str(full).startswith(f"disk full at {tmp_path}: stage distill-x")
    assert as_disk_full(WorkerGroupError("rank 0 failed", {0: ValueError("nan")}), tmp_path, 10**6, "s") is None
    shipped = pickle.loads(pickle.dumps(full))  # how Ray hands a stage's error to the driver
    assert str(shipped) == str(full) and shipped.errno == errno.ENOSPC


# --- the driver: one message and exit 1; a failed build's family view ---------------------------


def test_enospc_on_the_driver_is_one_message_and_exit_1(family, monkeypatch, capsys):
    spec, options, _ = family
    def disk_full(source, target):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr("builder.family.shutil.copyfile", disk_full)
    assert main([str(spec), "--workdir", str(options.workdir)]) == 1
    out = capsys.readouterr()
    spec_copy = options.workdir / "tiny-report" / "spec.yaml"
    assert f"error: disk full at {spec_copy}: build-family build needs more than the " in out.err
    assert "Traceback" not in out.out + out.err


def test_a_failed_builds_family_view_failing_on_a_full_disk_does_not_crash_it(family, checkpoint, monkeypatch,
                                                                                capsys):
    spec, options, plan = family
    finish(plan, options, checkpoint)
    monkeypatch.setattr("builder.running.runner.run_plan", failed_rebuild_of("tiny-width"))
    def disk_full(path, payload):  # the first picture, as a full disk refuses it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builder.report.plots.write_bytes_atomic", disk_full)
    assert main([str(spec), "--workdir", str(options.workdir), "--rebuild", "distill-tiny-width"]) == 1
    out = capsys.readouterr()
    plots = options.workdir / "tiny-report" / "plots"
    assert f"report: not written: disk full at {options.workdir / 'tiny-report'}: the family view needs" in out.out
    assert "Build failed: 1 stage(s) failed" in out.out and "Traceback" not in out.out + out.err
    assert not plots.exists() or not list(plots.iterdir())  # no 0-byte picture


def test_a_training_stages_disk_at_its_peak_and_once_finished_is_the_estimates(tmp_path, monkeypatch):
    teacher = save_tiny_checkpoint(tmp_path / "teacher", seed=0)
    student = save_tiny_checkpoint(tmp_path / "student", seed=1, num_hidden_layers=2)
    blocks = torch.randint(3, TINY_VOCAB, (40, 32), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "distill-x"
    held = []  # the folder's bytes each time a checkpoint is complete and the one before not yet removed
    remove = checkpoints._remove_old_checkpoints
    monkeypatch.setattr(checkpoints, "_remove_old_checkpoints",
                        lambda root, keep: (held.append(disk_space.bytes_under(out)), remove(root, keep)))
    steps, every = 5, 2
    distill(teacher, student, blocks, out, TrainSettings(tokens=steps * 4 * 32, batch_size=4, checkpoint_every=every))

    _, written = trained_tokens({"global_batch_size": 4, "tokens": steps * 4 * 32}, {"checkpoint_every": every}, 32)
    expected = training_disk(config_from_json(student / "config.json"), written)
    framing = framing_bytes(load_model(student))
    small_files = 256 * 1024  # metrics, result, config and tokenizer files of a tiny model
    assert written == len(held) == 2
    assert 0 <= max(held) - expected.peak <= 2 * framing + small_files  # two checkpoints at once
    assert 0 <= disk_space.bytes_under(out) - expected.kept <= framing + small_files


def test_through_ray_a_stage_short_of_space_is_one_failure_line_and_exit_1(family, monkeypatch, capsys):
    """The whole path: the driver's figure, the stage's own check on its worker (the real
    free space), DiskFull across Ray, the console's one line, the exit code."""
    spec, options, plan = family
    needed = 10**14  # 100 TB: more than any disk this runs on
    monkeypatch.setattr(FamilyEstimate, "disk_peaks", lambda estimate: {plan.original_teacher_stage: needed})
    assert main([str(spec), "--workdir", str(options.workdir)]) == 1
    out = capsys.readouterr()
    stage_dir = StageStore(options.workdir).path(plan.stages[plan.original_teacher_stage].key)
    (failure,) = [line for line in out.out.splitlines() if "FAILED" in line]
    assert "FAILED   acquire-teacher after " in failure
    assert f": DiskFull: disk full at {stage_dir}: stage {plan.original_teacher_stage} needs " \
           f"{format_bytes(needed + LOG_ROOM_BYTES)}, " in failure and " is free; free at least " in failure
    assert "Traceback" not in out.out + out.err and "Build failed: 1 stage(s) failed" in out.out
    assert "DiskFull" in (stage_dir / "stage.log").read_text()  # the whole story, in the stage's log


def test_a_ray_message_on_a_full_disk_is_still_one_line(tmp_path, monkeypatch):
    """Ray's thread hands its messages to the console, which keeps them in ray.log; a full disk
    there must not become a traceback in that thread."""
    console = Console(file=io.StringIO(), width=300)
    view = BuildConsole(SimpleNamespace(stages={}), StageStore(tmp_path), console, ray_log=tmp_path / "fam" / "ray.log")
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builder.running.console.open", disk_full, raising=False)
    view.ray_message("Task _execute failed due to oom. 2 worker(s) were killed.\nTop 10 memory users:")
    (line,) = console.file.getvalue().splitlines()
    assert "2 worker(s) were killed" in line and "not kept in" in line and "No space left on device" in line

"""Knowledge distillation and teacher correction: one training loop, pure torch.

    distill(teacher_dir, student_dir, blocks, out_dir, TrainSettings(tokens=10_000_000))
    correct_teacher(teacher_dir, blocks, out_dir, TrainSettings(tokens=..., loss="cross_entropy"))

The same loop runs in one process, or under torch.distributed (DDP, or FSDP2 when asked)
when a process group is initialized: torchrun, or Ray Train via `builder.training.ray_train`.
`train_blocks` is the acquire-data stage dir (its train split's shards are memory-mapped;
each rank reads only its slice of every step) or, for tests, a tensor [N, seq_len].
`out_dir` must be on disk every rank can read:

    out_dir/checkpoints/step-000050/     resumable state, every rank its own DCP shards
                                         (atomic: tmp dir + rename; see checkpoints.py)
    out_dir/checkpoints/latest           names the newest complete checkpoint
    out_dir/metrics.jsonl                one JSON line per logged step (rank 0)
    out_dir/model/                       final HF checkpoint (safetensors shards) + tokenizer
    out_dir/result.json                  TrainResult, written last (rank 0)

A run started again on the same `out_dir` resumes from `latest` (losing at most one
checkpoint interval) and, because the data order, RNG states, optimizer and schedule are
all restored, ends with the same weights as a run that was never interrupted.

Modules, in the order the loop uses them: settings (TrainSettings, TrainResult), data (the
block stream; its per-epoch permutation is builder.data.shuffle), parallel (World, DDP/FSDP2), aligner (the hidden-state loss), losses (chunked
logit losses), step (forward/backward of one step), optim, checkpoints, metrics, and loop
(`train`, `distill`, `correct_teacher`); ray_train runs the loop on Ray Train workers.
Nothing is re-exported here, so reading one module (settings, losses) never imports the loop.
"""

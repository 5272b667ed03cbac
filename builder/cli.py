"""`build-family`: build, plan, report or publish a model family from one YAML spec.

examples:
  build-family families/smollm2-135m.yaml --dry-run   # the plan: stages, shapes, params
  build-family families/smollm2-135m.yaml             # build it (local Ray on 127.0.0.1)
  build-family families/x.yaml --verbose              # ... showing every process's output
  build-family families/x.yaml --address ray://head:10001 --gpus-per-stage 1   # on a cluster
  build-family families/x.yaml --rebuild distill      # redo a finished stage and what reads it
  build-family status families/x.yaml                 # which stages are done, running, pending
  build-family verify families/x.yaml                 # read every finished stage's files whole
  build-family report families/x.yaml                 # rewrite the report from the run dir
  build-family publish families/x.yaml [--dry-run]    # push evaluated students to the Hub
  build-family schema                                 # the spec's JSON schema

exit codes:
  0  done (built, printed, published)
  1  a stage failed (its log path is printed; run again to resume), report/publish
     could not do their work (the message says why), or verify found a damaged stage
  2  the spec has problems (all are listed; nothing ran)
  143  stopped by SIGTERM (stages in flight cancelled, finished ones kept: rerun to resume;
     nothing half-written)

Each stage's full output is in <workdir>/stages/<stage>/stage.log. Writing a spec:
docs/writing-a-family.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from builder.running import interrupt
from builder.errors import SpecError
from builder.options.run_options import RunOptions
from builder.spec.schema import json_schema

COMMANDS = ("build", "status", "verify", "report", "publish", "schema")


def parse_args(argv: list[str]) -> argparse.Namespace:
    if not argv or argv[0] not in COMMANDS + ("-h", "--help", "--version"):
        argv = ["build", *argv]  # `build-family SPEC` is the common case
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(prog="build-family", description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the family (default command)", epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(build)
    build.add_argument("--verbose", action="store_true",
                       help="also print every process's output (Ray, transformers, lm-eval, vLLM) and the "
                            "whole plan; without it they go to each stage's stage.log only")
    build.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    build.add_argument("--gpu", choices=("h100", "h200", "a100", "l40s"), default="h100",
                       help="the accelerator --dry-run estimates time and memory for (bf16 peak, memory)")
    build.add_argument("--mfu", type=float, default=0.4,
                       help="model-FLOPs utilisation the estimate assumes (default 0.4)")
    build.add_argument("--disk-gbps", type=float,
                       help="disk bandwidth in GB/s per worker the estimate assumes for loading models and "
                            "writing checkpoints (default: printed in the dry run's notes)")
    build.add_argument("--rehearse", action="store_true",
                       help="run the whole plan on a small random model of the teacher's architecture with tiny "
                            "budgets, on a CPU in minutes, in WORKDIR/rehearsal/ (labelled a rehearsal)")
    build.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    build.add_argument("--cpus-per-stage", type=int, default=0, help="CPUs per heavy stage (0: all local CPUs)")
    build.add_argument("--gpus-per-stage", type=float, default=0.0, help="GPUs per heavy stage")
    build.add_argument("--train-workers", type=int, default=1,
                       help="Ray Train workers per training stage; they split the spec's global_batch_size (it "
                            "must divide it): the same steps over the same data, summed in another order, whose "
                            "rounding stays small in float32 and shows in bfloat16 weights; not in the stage hash, "
                            "and the report says which layout made the weights")
    build.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                       help="how training workers share the models: ddp (a full replica each) or fsdp "
                            "(FSDP2 shards parameters, gradients and optimizer state across workers, for "
                            "models that do not fit one device)")
    build.add_argument("--publish", action="store_true", help="publish evaluated students after the build")
    build.add_argument("--rebuild", action="append", default=[], metavar="STAGE",
                       help="redo this stage and every stage that reads it, although finished: a stage "
                            "kind (distill), one without its hash (distill-tiny-width) or a full id; repeatable")
    status = commands.add_parser("status", help="which stages are done, running (in a live build) or pending")
    _add_common(status)
    verify = commands.add_parser("verify", help="read every file of every finished stage whole and check it against "
                                                "the digest recorded when it was written (a build checks sizes and "
                                                "headers, and each file as a stage reads it); marks damaged stages "
                                                "so the next build redoes them")
    _add_common(verify)
    report = commands.add_parser("report", help="rewrite report.json/report.md/cards from the run directory")
    _add_common(report)
    publish = commands.add_parser("publish", help="publish an existing run's students to the Hub")
    _add_common(publish)
    publish.add_argument("--dry-run", action="store_true", help="list repos and files, upload nothing")
    publish.add_argument("--force", action="store_true", help="publish students whose evaluation failed")
    commands.add_parser("schema", help="print the spec's JSON schema")
    return parser.parse_args(argv)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", type=Path, help="the family YAML, e.g. families/smollm2-135m.yaml")
    parser.add_argument("--workdir", type=Path, default=Path("runs"), help="run directory (default: runs/)")
    parser.add_argument("--teacher-config", type=Path,
                        help="the teacher's config.json, to plan without fetching the teacher")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="training autocast, part of the training stages' hash (auto: bfloat16 on GPUs and "
                             "on CPUs with native bf16 where a probe shows it faster, else float32; report "
                             "and publish: what the last build resolved)")


def version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"build-family {version('minizoo')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "build-family (version unknown: minizoo is not installed; `pip install -e .`)"


def options_from(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        workdir=args.workdir.resolve(),
        address=getattr(args, "address", None),
        cpus_per_stage=getattr(args, "cpus_per_stage", 0),
        gpus_per_stage=getattr(args, "gpus_per_stage", 0.0),
        train_workers=getattr(args, "train_workers", 1),
        parallel=getattr(args, "parallel", "ddp"),
        teacher_config=args.teacher_config,
        precision=getattr(args, "precision", "auto"),
        gpu=getattr(args, "gpu", "h100"),
        mfu=getattr(args, "mfu", 0.4),
        disk_gbps=getattr(args, "disk_gbps", None),
        verbose=getattr(args, "verbose", False),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # The console view (builder.running.console) reports progress; the driver's own log lines are
    # for --verbose, and warnings always.
    level = logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    # SIGTERM is noted, and acted on where a build can stop cleanly (builder.running.interrupt); a
    # publish is left to die at once (its Hub commits are atomic).
    noted = args.command in ("build", "report")
    with interrupt.sigterm_noted() if noted else contextlib.nullcontext():
        try:
            code = _run_command(args)
        except SpecError as error:
            print(error, file=sys.stderr)
            return 2
        except interrupt.BuildStopped as stop:
            return _stopped(stop)
        if interrupt.stop_requested():  # it came while files were written: they were finished first
            return _stopped(interrupt.BuildStopped("stopped by SIGTERM"))
        return code


def _stopped(stop: interrupt.BuildStopped) -> int:
    print(f"build-family {stop}; finished stages are kept, run the same command to resume "
          f"(exit code {interrupt.STOPPED_EXIT_CODE})", file=sys.stderr)
    return interrupt.STOPPED_EXIT_CODE


def _run_command(args: argparse.Namespace) -> int:
    # torch and transformers load with planning: not for --help, --version or schema
    from builder import family

    options = options_from(args)
    started = time.perf_counter()
    if args.command == "status":
        print(family.status(args.spec, options))
        return 0
    if args.command == "verify":
        return family.verify(args.spec, options)
    if args.command == "report":
        return family.write_report(args.spec, options)
    if args.command == "publish":
        return family.publish(args.spec, options, dry_run=args.dry_run, force=args.force)
    if args.dry_run:
        print(family.describe_plan(args.spec, options, tuple(args.rebuild)))
        return 0
    if args.rehearse:
        # transformers: only for a rehearsal
        from builder.rehearse import rehearse

        return rehearse(args.spec, options)
    code = family.build(args.spec, options, publish=args.publish, rebuild=tuple(args.rebuild))
    print(f"build-family finished in {time.perf_counter() - started:.1f} s (exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())

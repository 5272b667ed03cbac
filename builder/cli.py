"""`build-family`: build, plan, report or publish a model family from one YAML spec.

    build-family families/smollm2-135m.yaml --dry-run   # the plan: stages, shapes, params
    build-family families/smollm2-135m.yaml             # build it (local Ray on 127.0.0.1)
    build-family families/x.yaml --address ray://head:10001   # on a cluster
    build-family report families/x.yaml                 # rewrite the report from the run dir
    build-family publish families/x.yaml [--dry-run]    # push evaluated students to the Hub
    build-family schema                                 # the spec's JSON schema

Exit codes: 0 built, 1 a stage failed, 2 the spec has problems (all listed, nothing ran).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from builder.errors import SpecError
from builder.options import RunOptions

log = logging.getLogger("build-family")
COMMANDS = ("build", "report", "publish", "schema")


def parse_args(argv: list[str]) -> argparse.Namespace:
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["build", *argv]  # `build-family SPEC` is the common case
    parser = argparse.ArgumentParser(prog="build-family", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the family (default command)")
    _add_common(build)
    build.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    build.add_argument("--gpu", choices=("h100", "h200", "a100", "l40s"), default="h100",
                       help="the accelerator --dry-run estimates time and memory for (bf16 peak, memory)")
    build.add_argument("--mfu", type=float, default=0.4,
                       help="model-FLOPs utilisation the estimate assumes (default 0.4)")
    build.add_argument("--rehearse", action="store_true",
                       help="run the whole plan on a small random model of the teacher's architecture with tiny "
                            "budgets, on a CPU in minutes, in WORKDIR/rehearsal/ (labelled a rehearsal)")
    build.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    build.add_argument("--cpus-per-stage", type=int, default=0, help="CPUs per heavy stage (0: all local CPUs)")
    build.add_argument("--gpus-per-stage", type=float, default=0.0, help="GPUs per heavy stage")
    build.add_argument("--train-workers", type=int, default=1, help="Ray Train workers per training stage")
    build.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                       help="how training workers share the models: ddp (a full replica each) or fsdp "
                            "(FSDP2 shards parameters, gradients and optimizer state across workers, for "
                            "models that do not fit one device)")
    build.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                       help="training autocast (auto: bfloat16 on GPU, float32 on CPU)")
    build.add_argument("--publish", action="store_true", help="publish evaluated students after the build")
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
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "schema":
        from builder.spec import json_schema

        print(json.dumps(json_schema(), indent=2))
        return 0
    try:
        return _run_command(args)
    except SpecError as error:
        print(error, file=sys.stderr)
        return 2


def _run_command(args: argparse.Namespace) -> int:
    from builder import family

    options = options_from(args)
    started = time.perf_counter()
    if args.command == "report":
        print(family.write_report(args.spec, options))
        return 0
    if args.command == "publish":
        return family.publish(args.spec, options, dry_run=args.dry_run, force=args.force)
    if args.dry_run:
        print(family.describe_plan(args.spec, options))
        return 0
    if args.rehearse:
        from builder.rehearse import rehearse

        return rehearse(args.spec, options)
    code = family.build(args.spec, options, publish=args.publish)
    log.info("build-family finished in %.1f s (exit code %d)", time.perf_counter() - started, code)
    return code


if __name__ == "__main__":
    sys.exit(main())

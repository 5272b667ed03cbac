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
  1  a stage failed (its log path is printed; run again to resume), the disk is full (the
     message names the path, the space needed and free), the Ray cluster could not be
     reached or refused the driver (within --connect-timeout), report/publish could not
     do their work (the message says why), or verify found a damaged stage
  2  the spec or the flags have problems (all are listed; nothing ran)
  3  a student failed its quality gate (build or report: every stage finished; the report
     names the student, its ratio and the floor; publishing refuses it, not the others)
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
from builder.running.cluster_address import ClusterUnreachable
from builder.errors import SpecError
from builder.options.flags import FlagError, add_flags, options_from
from builder.options.run_options import RunOptions
from builder.spec.schema import json_schema
from builder.store.disk_space import as_disk_full

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
    _add_spec(build)
    add_flags(build, every_command_only=False)  # the run options (builder.options.run_options)
    build.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    build.add_argument("--publish", action="store_true", help="publish evaluated students after the build")
    build.add_argument("--rebuild", action="append", default=[], metavar="STAGE",
                       help="redo this stage and every stage that reads it, although finished: a stage "
                            "kind (distill), one without its hash (distill-tiny-width) or a full id; repeatable")
    _run_reader(commands, "status", "which stages are done, running (in a live build) or pending")
    _run_reader(commands, "verify", "read every file of every finished stage whole and check it against the "
                "digest recorded when it was written (a build checks sizes and headers, and each file as a stage "
                "reads it); marks damaged stages so the next build redoes them")
    _run_reader(commands, "report", "rewrite report.json/report.md/cards from the run directory")
    publish = _run_reader(commands, "publish", "publish an existing run's students to the Hub")
    publish.add_argument("--dry-run", action="store_true", help="list repos and files, upload nothing")
    publish.add_argument("--force", action="store_true", help="publish students whose evaluation failed")
    commands.add_parser("schema", help="print the spec's JSON schema")
    return parser.parse_args(argv)


def _run_reader(commands, name: str, help_text: str) -> argparse.ArgumentParser:
    """A command that reads a run: the spec and the run options every command takes."""
    parser = commands.add_parser(name, help=help_text)
    _add_spec(parser)
    add_flags(parser, every_command_only=True)
    return parser


def _add_spec(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", type=Path, help="the family YAML, e.g. families/smollm2-135m.yaml")


def version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"build-family {version('minizoo')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "build-family (version unknown: minizoo is not installed; `pip install -e .`)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        options = options_from(args)
    except FlagError as error:
        print(f"build-family: {error}", file=sys.stderr)
        return 2
    # The console view (builder.running.console) reports progress; the driver's own log lines are
    # for --verbose, and warnings always.
    level = logging.INFO if options.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    # SIGTERM is noted, and acted on where a build can stop cleanly (builder.running.interrupt); a
    # publish is left to die at once (its Hub commits are atomic).
    noted = args.command in ("build", "report")
    with interrupt.sigterm_noted() if noted else contextlib.nullcontext():
        try:
            code = _run_command(args, options)
        except SpecError as error:
            print(error, file=sys.stderr)
            return 2
        except ClusterUnreachable as error:  # not the spec's fault: the same command works once the cluster does
            print(f"build-family {error}", file=sys.stderr)
            return 1
        except interrupt.BuildStopped as stop:
            return _stopped(stop)
        except Exception as error:  # a full disk, wherever the driver wrote: one message, no traceback
            full = as_disk_full(error, getattr(args, "workdir", Path.cwd()), 0, f"build-family {args.command}")
            if full is None:
                raise
            print(f"error: {full}", file=sys.stderr)
            return 1
        if noted and interrupt.stop_requested():  # it came while files were written: they were finished first
            return _stopped(interrupt.BuildStopped("stopped by SIGTERM"))
        return code


def _stopped(stop: interrupt.BuildStopped) -> int:
    print(f"build-family {stop}; finished stages are kept, run the same command to resume "
          f"(exit code {interrupt.STOPPED_EXIT_CODE})", file=sys.stderr)
    return interrupt.STOPPED_EXIT_CODE


def _run_command(args: argparse.Namespace, options: RunOptions) -> int:
    # torch and transformers load with planning: not for --help, --version or schema
    from builder import family

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
    if options.rehearsal:
        # transformers: only for a rehearsal
        from builder.rehearse import rehearse

        return rehearse(args.spec, options)
    code = family.build(args.spec, options, publish=args.publish, rebuild=tuple(args.rebuild))
    print(f"build-family finished in {time.perf_counter() - started:.1f} s (exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())

"""python -m agent COMMAND: the worker side of the sweep service.

  run       train once with --key=value flags (the program every sweep runs)
  validate  check sweep YAMLs against W&B's schema and our config
  local     run a sweep YAML offline, no W&B server: trials in parallel, resumable
  status    the trial table of a local sweep (--json for scripts)
  create    validate a sweep YAML, then create it on W&B
  launch    start one W&B agent per GPU on this box
  report    compare a sweep's trials: DIR/report.html for a local sweep, a table for a W&B one
  best      the best trial: its run command, checkpoint, --evaluate, --export (torch.export)
"""

import os
import sys

from agent.contract import COSTS, STORE_ENV, WARM_SOCKET_ENV

if __name__ == "__main__" and sys.argv[1:2] == ["run"] and os.environ.get(WARM_SOCKET_ENV):
    # A warm worker for this slot (agent local, agent launch): the trial starts in a process that has
    # imported torch, Lightning and wandb already. This one imports only the standard library.
    from agent.program.handoff import run_warm

    if (code := run_warm(sys.argv[2:])) is not None:
        sys.exit(code)

import argparse  # noqa: E402  (after the warm path, which must not pay for these)
import atexit  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402

from agent.errors import RunEndedEarly, UsageError  # noqa: E402


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line, `agent COMMAND: message`, not the usage and the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog.removeprefix('python -m ')}: {message}\n")


def _at_least(convert, minimum: int, kind: str, text: str):
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < minimum:
        raise argparse.ArgumentTypeError(f"expected {kind} >= {minimum}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _at_least(int, 1, "an integer", text)


def non_negative_int(text: str) -> int:
    return _at_least(int, 0, "an integer", text)


def seconds(text: str) -> float:
    return _at_least(float, 0, "a number of seconds", text)


def run_command(args) -> int:
    if args.help:
        from agent.program.flags import config_help

        args.print_help()
        print("\n" + config_help())
        return 0
    from agent.program.run import run

    result = run(args.flags)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0


def validate_command(args) -> int:
    from agent.program.validate import validate

    return validate(args.files)


def write_report(directory):
    from agent.views.report import write_report  # matplotlib loads only for --report

    return write_report(directory)


def command_line(argv: list[str]) -> str:
    """This command as the user runs it again: `python -m agent ...`, the interpreter named by its path when the
    `python` on PATH is another one (a virtual environment that is not activated)."""
    try:  # asked, not looked up: `python` may be a shim (pyenv) that runs this one, or a link to its base
        answer = subprocess.run(["python", "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                                timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        answer = ""
    same = answer == sys.prefix  # the environment, whose packages the command will see
    return shlex.join(["python" if same else sys.executable, "-m", "agent", *argv])


def local_command(args) -> int:
    """The controller runs any W&B program; what is ours (the config checks, the data, warm workers that
    import our code, resumable trials) is decided here."""
    from agent.controller.local import LocalSweep, Options
    from agent.controller.opened import open_sweep, progress, same_sweep
    from agent.install import pair_problem
    from agent.online.launch import parse_gpus
    from agent.program.validate import checked_sweep, runs_our_program
    from agent.views.status import SweepView

    if args.gpus_per_trial > 1 and not args.gpus:
        raise UsageError("--gpus-per-trial needs --gpus (without GPUs, set the config's devices in the YAML)")
    gpus = parse_gpus(args.gpus, "local", args.gpus_per_trial) if args.gpus else [None] * args.workers
    sweep = checked_sweep(args.sweep)
    store_url = args.store or os.environ.get(STORE_ENV)
    if store_url and not store_url.startswith("postgresql://"):
        raise UsageError(f"--store={store_url!r}: expected postgresql://USER@HOST[:PORT]/DB (without it, the "
                         "store is SQLite, DIR/sweep.db)")
    if args.new and (args.dir or args.sweep_id):
        raise UsageError("--new starts a sweep in a new ./sweeps-local/SWEEP_ID: leave out --dir and --sweep-id")
    directory = args.dir
    if not (directory or store_url or args.new) and (same := same_sweep(sweep, args.count, args.retry_crashed)):
        folder, trials, work_left = same  # the same command again goes on with this YAML's sweep
        if not work_left:
            print(f"sweep {folder.name} of this YAML ({folder}) is finished: {progress(trials, sweep, args.count)}; "
                  f"for more trials, raise --count (the total across runs), or start another sweep of it: "
                  f"{command_line([*args.argv, '--new'])}")
            return 0
        print(f"resuming sweep {folder.name} ({folder}): {progress(trials, sweep, args.count)}; --new starts another",
              flush=True)
        directory = str(folder)
    ours = runs_our_program(sweep)
    if problem := pair_problem():
        if ours:
            raise UsageError(f"the sweep's program cannot run here: {problem}")
        print(f"agent local: warning: {problem}", file=sys.stderr)
    if ours:
        from agent.program.inputs import prepare_sweep

        prepare_sweep(sweep)
    opened = open_sweep(sweep, directory, args.sweep_id, store_url)
    if opened.store.postgres:
        print(f"sweep {opened.sweep_id} in {opened.store.where()}; on other boxes: python -m agent local {args.sweep} "
              f"--store {opened.store.where()} --sweep-id {opened.sweep_id} --dir {opened.root.resolve()}", flush=True)
    options = Options(gpus, args.count, args.retry_crashed, args.max_consecutive_failures, args.grace,
                      warm=ours and not args.cold, resumes=ours,
                      resume_command=command_line([a for a in args.argv if a != "--new"]))
    view = SweepView(opened.sweep_id, sweep, opened.root)
    return LocalSweep(opened, options, view, on_trial_end=write_report if args.report else None).run()


def status_command(args) -> int:
    from agent.views.status import status

    return status(args.dir, args.json)


def create_command(args) -> int:
    """Checked as `validate` checks (our program's config too), before any call to W&B."""
    from agent.online.launch import create
    from agent.program.validate import checked_sweep, project_of

    sweep = checked_sweep(args.sweep)
    return create(args.sweep, sweep, args.project or project_of(sweep), args.entity)


def launch_command(args) -> int:
    from agent.online.launch import Launcher
    from agent.program.validate import runs_our_program

    launcher = Launcher(args.sweep_path, args.gpus, args.agents_per_gpu, args.count, args.stagger, args.max_restarts,
                        warm_for=None if args.cold else runs_our_program, gpus_per_trial=args.gpus_per_trial,
                        scheduler=args.scheduler)
    return launcher.dry_run() if args.dry_run else launcher.run()


def report_command(args) -> int:
    from agent.views.report import report

    return report(args.target)


def best_command(args) -> int:
    from agent.controller.store import is_local_target

    is_local_target(args.target)  # a wrong TARGET is told before torch loads
    from agent.program.use import best

    return best(args.target, args.evaluate, args.export, args.trial, args.where or [])


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m agent", description="The worker side of the sweep service.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", add_help=False, help="train once; --key=value flags set TrainConfig fields",
                              description="Train once. Under a W&B sweep, the sweep's values override flags and "
                                          "defaults. Logs to W&B (WANDB_MODE=offline works) and returns metrics.")
    run.add_argument("-h", "--help", action="store_true")
    run.set_defaults(func=run_command, print_help=run.print_help)

    validate = commands.add_parser("validate", help="check sweep YAMLs; exit 0 only when all are valid",
                                   description="Check each sweep YAML against W&B's schema and, when it runs "
                                               "our program, against TrainConfig. A line per problem.")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(func=validate_command)

    local = commands.add_parser(
        "local", help="run a sweep YAML offline (no W&B server)",
        description="Run a W&B sweep YAML with no server: W&B's own engine suggests the trials, each runs as "
                    "`wandb agent` would run it, offline, under DIR. The same command again resumes the sweep of "
                    "this YAML under ./sweeps-local (or the one in --dir).")
    local.set_defaults(func=local_command)
    local.add_argument("sweep", metavar="SWEEP.yaml")
    local.add_argument("--count", type=positive_int, metavar="N",
                       help="the sweep's total number of trials, counted across resumes of DIR (default: the "
                            "YAML's run_cap, a grid's size, or no limit)")
    workers = local.add_mutually_exclusive_group()
    workers.add_argument("--workers", type=positive_int, default=1, metavar="N", help="trials in parallel (default 1)")
    workers.add_argument("--gpus", help="one trial at a time per GPU (or per group, --gpus-per-trial): all (every GPU "
                                        "torch sees) or a list like 0,1 (sets CUDA_VISIBLE_DEVICES)")
    local.add_argument("--gpus-per-trial", type=positive_int, default=1, metavar="N",
                       help="GPUs of each trial (DDP, one process per GPU): --gpus in groups of N (default 1)")
    local.add_argument("--dir", help="state and runs (default: ./sweeps-local/SWEEP_ID, the unfinished sweep of the "
                                     "same YAML there if there is one, else a new one)")
    local.add_argument("--new", action="store_true",
                       help="start another sweep of this YAML, even if an unfinished one is under ./sweeps-local")
    local.add_argument("--sweep-id", help="use this id (e.g. of a W&B sweep made from the same YAML, so the runs "
                                          "join it on `wandb sync`); with --store, the sweep to join there if it "
                                          "exists; default: a new random id")
    local.add_argument("--store", metavar="URL",
                       help="keep the sweep in PostgreSQL, postgresql://USER@HOST[:PORT]/DB, shared by the "
                            f"controllers of many boxes (or ${STORE_ENV}; password: PGPASSWORD or ~/.pgpass); "
                            "default: SQLite, DIR/sweep.db")
    local.add_argument("--retry-crashed", action="store_true", help="rerun trials whose controller died")
    local.add_argument("--max-consecutive-failures", type=positive_int, default=5, metavar="N",
                       help="stop after N failed trials in a row (default 5)")
    local.add_argument("--report", action="store_true",
                       help="rewrite DIR/report.html each time a trial ends (see `report`); its path is the last line")
    local.add_argument("--grace", type=seconds, default=60.0, metavar="SECONDS",
                       help="after SIGTERM, how long a stopped trial may take to save before SIGKILL (default 60)")
    local.add_argument("--cold", action="store_true",
                       help="start every trial as a fresh process that imports everything itself (default: a warm "
                            "worker per slot forks each trial of our program, ready to train)")

    status = commands.add_parser("status", help="the trial table of a local sweep",
                                 description="Print the trials of a local sweep: id, state, metric, config.")
    status.add_argument("dir", metavar="DIR")
    status.add_argument("--json", action="store_true", help="a JSON list of trials instead of a table")
    status.set_defaults(func=status_command)

    create = commands.add_parser("create", help="validate a sweep YAML, then create the sweep on W&B",
                                 description="Validate the YAML (an invalid one is refused before any network "
                                             "call), create the sweep on W&B, print the launch command.")
    create.add_argument("sweep", metavar="SWEEP.yaml")
    create.add_argument("--project", help="W&B project (default: the YAML's, WANDB_PROJECT, or cifar10-sweeps)")
    create.add_argument("--entity", help="W&B entity (default: your default entity)")
    create.set_defaults(func=create_command)

    launch = commands.add_parser(
        "launch", help="start one W&B agent per GPU on this box",
        description="Start one `wandb agent` per GPU slot, pinned with CUDA_VISIBLE_DEVICES and staggered; "
                    "restart agents that die; forward SIGINT/SIGTERM; exit when all agents are done.")
    launch.set_defaults(func=launch_command)
    launch.add_argument("sweep_path", metavar="ENTITY/PROJECT/SWEEP_ID")
    launch.add_argument("--gpus", default="all", help="all (every GPU torch sees) or a list like 0,1,3")
    launch.add_argument("--agents-per-gpu", type=positive_int, default=1, metavar="N",
                        help="agents sharing each GPU, or each group of --gpus-per-trial (default 1)")
    launch.add_argument("--gpus-per-trial", type=positive_int, default=1, metavar="N",
                        help="GPUs of each run (DDP, one process per GPU): --gpus in groups of N, an agent per group "
                             "(default 1)")
    launch.add_argument("--count", type=positive_int, metavar="N",
                        help="runs per agent, as `wandb agent --count` (default: until the sweep ends)")
    launch.add_argument("--stagger", type=seconds, default=10.0, metavar="SECONDS",
                        help="pause between agent starts (default 10)")
    launch.add_argument("--max-restarts", type=non_negative_int, default=3, metavar="N",
                        help="restarts of an agent that dies before giving up on it (default 3)")
    launch.add_argument("--dry-run", action="store_true", help="print each agent's command line; start nothing")
    launch.add_argument("--scheduler", action="store_true",
                        help="also run the sweep's `wandb sweep-scheduler` here (a sweep with a scheduler: block needs "
                             "one, on one box only: W&B allows one a sweep; its source file must be here)")
    launch.add_argument("--cold", action="store_true",
                        help="every run a fresh process that imports everything itself (default: a warm worker per "
                             "agent forks each run of our program, ready to train)")

    report = commands.add_parser(
        "report", help="compare a sweep's trials",
        description="A local sweep DIR: write DIR/report.html (self-contained: table, metric over trials, "
                    "parallel coordinates, parameter importance, learning curves, the best trial's "
                    "prediction images) and the plots as PNGs in DIR/report/. ENTITY/PROJECT/SWEEP_ID: "
                    "print the runs' table and the dashboard URL.")
    report.add_argument("target", metavar="DIR|ENTITY/PROJECT/SWEEP_ID")
    report.set_defaults(func=report_command)

    best = commands.add_parser(
        "best", help="the best trial: run command, checkpoint, evaluation, export",
        description="Print the best trial, its config as a `python -m agent run` line, and its best checkpoint "
                    "(downloaded for a W&B sweep). A sweep with several objectives: its Pareto front first, best "
                    "by the first objective first, and the front's best by it (or the one --trial or --where "
                    "picks).")
    best.add_argument("target", metavar="DIR|ENTITY/PROJECT/SWEEP_ID")
    best.set_defaults(func=best_command)
    chosen = best.add_mutually_exclusive_group()
    chosen.add_argument("--trial", metavar="ID", help="take this trial (any with a logged model), not the best")
    chosen.add_argument("--where", action="append", metavar="'NAME OP NUMBER'",
                        help="take the best trial that meets this, e.g. 'latency_ms < 2' (OP: < <= > >=; NAME: one "
                             f"of the sweep's objectives or {', '.join(COSTS)}); repeat to "
                             "AND several; with several objectives, the best by the first on the Pareto front")
    best.add_argument("--evaluate", action="store_true",
                      help="rerun the test set on the checkpoint: test accuracy and per-class accuracy")
    best.add_argument("--export", metavar="PATH", help="write the network with torch.export, a .pt2 that needs "
                                                       "only torch (normalisation and class names inside; input: "
                                                       "float images in [0, 1] or 0-255)")
    return parser


def check_install(command: str) -> None:
    """A torch and torchvision that do not belong together, said by the first command a user runs (pip may
    have left them so and exited 0): refused where this command loads networks, else a warning. `local` says
    it itself, once it knows whether the sweep runs our program."""
    from agent.install import pair_problem

    if command != "local" and (problem := pair_problem()):
        if command in ("run", "best"):
            raise UsageError(problem)
        print(f"agent {command}: warning: {problem}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, flags = build_parser().parse_known_args(argv)
    args.argv = argv
    try:
        if args.command == "run":  # its flags are TrainConfig's, checked by agent.program.run
            args.flags = flags
        elif flags:
            raise UsageError(f"unrecognized arguments: {' '.join(flags)}")
        check_install(args.command)
        return args.func(args)
    except UsageError as e:
        print(f"agent {args.command}: {e}", file=sys.stderr)
        return 2
    except RunEndedEarly as e:
        print(f"agent {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    code = main()
    if sys.argv[1:2] == ["run"]:
        # The run is finished and flushed: run the exit hooks (wandb's among them), then skip the
        # interpreter's teardown of torch and Lightning, which takes seconds and saves nothing.
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

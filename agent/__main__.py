"""python -m agent COMMAND: the worker side of the sweep service.

  run       train once with --key=value flags (the program every sweep runs)
  validate  check sweep YAMLs against W&B's schema and our config
"""

import argparse
import sys

from agent.errors import UsageError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m agent", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_parser = commands.add_parser(
        "run", help="train once; flags --key=value set TrainConfig fields", add_help=False,
        description="Train once. Under a W&B sweep, the sweep's values override flags and defaults.")
    run_parser.add_argument("-h", "--help", action="store_true")
    validate_parser = commands.add_parser(
        "validate", help="check sweep YAMLs; exit 0 only when all are valid",
        description="Check each sweep YAML against W&B's schema and, when it runs our program, TrainConfig.")
    validate_parser.add_argument("files", nargs="+", metavar="FILE")

    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "run":
            from agent.run import config_help, run

            if args.help:
                run_parser.print_help()
                print("\n" + config_help())
                return 0
            result = run(rest)
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
            return 0
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from agent.validate import validate

        return validate(args.files)
    except UsageError as e:
        print(f"agent {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

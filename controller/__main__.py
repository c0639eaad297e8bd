"""`python -m controller` is the `cluster` command."""

import sys


def main() -> int:
    try:
        from controller.cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:
        from controller.errors import ExitStatus

        return ExitStatus.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

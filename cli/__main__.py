"""``moestream`` and ``python -m moestream``: the command line, with Ctrl-C during start-up (while the
commands' modules are still being imported) ending as quietly as Ctrl-C inside a command."""

import sys


def main() -> None:
    try:
        from moestream.main import cli
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    cli()


if __name__ == "__main__":
    main()

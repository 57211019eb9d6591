"""The ``novacron`` command: run the control plane and manage hosts and VMs from a shell.

One module per group of subcommands; :func:`main` is the entry point.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from novacron.cli.parser import build_parser, settings_from
from novacron.cli.render import err
from novacron.errors import NovaCronError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``novacron`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for kv in getattr(args, "label", []):
        if "=" not in kv:
            parser.error(f"--label takes key=value, got {kv!r}")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # the head and every client must agree
    try:
        settings = settings_from(args)
        code: int = args.func(args, settings)
        return code
    except NovaCronError as exc:
        err.print(f"[bold red]error[/] ({exc.code}): {exc.message}")
        return 1
    except ValueError as exc:  # pydantic validation of arguments
        err.print(f"[bold red]error[/]: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130


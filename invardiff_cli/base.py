"""What every command of ``invardiff`` and ``invardiff-registry`` shares.

- Output: :func:`emit` prints JSON on stdout (``--json``) or the human text; :func:`log` sends
  progress to stderr.
- Errors: :class:`Main` turns every failure into one line on stderr and an exit code
  (``INVARDIFF_DEBUG=1`` adds the traceback); usage errors exit 2, ``--help`` exits 0.
- Secrets: the passwords of this run's database and S3 URLs and ``AWS_SECRET_ACCESS_KEY`` are
  masked in every message (:func:`masked`).
- Options and types: :data:`json_option`, :data:`FINITE`, :data:`RESOLUTION`, :data:`STEPS`.
- Help: argparse-style lower-case headings (``usage:``, ``options:``, ``commands:``).

Only click and light registry modules are imported here, so ``--help`` and a cached ``fetch``
stay fast.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from registry.config import Config
from registry.errors import GENERIC, USAGE, RegistryError
from registry.matching import Resolution
from registry.validation import MAX_STEPS, mask_secrets, url_secrets

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY",)
URL_ENV = ("INVARDIFF_DATABASE_URL", "INVARDIFF_S3_ENDPOINT_URL")
_SECRETS: list[str] = []  # this run's secrets: never printed


class HelpFormatter(click.HelpFormatter):
    """Help with argparse's lower-case headings."""

    def write_usage(self, prog: str, args: str = "", prefix: str | None = None) -> None:
        super().write_usage(prog, args, "usage: " if prefix is None else prefix)

    def section(self, name: str):
        return super().section(name.lower())


class Context(click.Context):
    formatter_class = HelpFormatter


class Command(click.Command):
    context_class = Context


class Group(click.Group):
    context_class = Context
    command_class = Command


Group.group_class = Group


def command(*args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Command]:
    """``click.command`` with this CLI's help conventions."""
    return click.command(*args, cls=Command, **kwargs)


def group(*args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Group]:
    """``click.group`` with this CLI's help conventions."""
    return click.group(*args, cls=Group, **kwargs)


class Main(Group):
    """A top-level group whose every outcome is an exit code and at most one stderr line.

    :meth:`outcome` returns the code of a command that ran (0, or the error's); usage errors
    and ``--help`` exit at once (SystemExit 2 / 0), as argparse does. :meth:`main` exits with
    the outcome. Subclasses say which exceptions are expected failures (:meth:`explain`).
    """

    def explain(self, exc: Exception) -> tuple[int, str] | None:
        """The exit code and message of an expected failure; None for an unexpected one."""
        if isinstance(exc, RegistryError):
            return exc.exit_code, str(exc)
        return None

    def outcome(self, args: list[str] | None = None, prog_name: str | None = None) -> int:
        """Run the command line ``args``; the exit code of the command that ran."""
        prog = prog_name or self.name or "?"
        args = list(sys.argv[1:] if args is None else args)
        _SECRETS[:] = run_secrets(args)
        try:
            result = super().main(args, prog, standalone_mode=False)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else prog
            fail(f"{where}: error: {exc.format_message()} (see --help)", USAGE)
        except click.ClickException as exc:
            return report(f"{prog}: error: {exc.format_message()}", exc.exit_code)
        except click.Abort:
            return report(f"{prog}: aborted", GENERIC)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line
            if os.environ.get("INVARDIFF_DEBUG", "") not in ("", "0"):
                import traceback

                click.echo(masked(traceback.format_exc()).rstrip(), err=True)
            known = self.explain(exc)
            if known is not None:
                return report(f"{prog}: error: {known[1]}", known[0])
            return report(
                f"{prog}: error: unexpected {type(exc).__name__}: {exc} "
                "(INVARDIFF_DEBUG=1 shows more)",
                GENERIC,
            )
        if isinstance(result, int):  # --help or an explicit exit
            sys.exit(result)
        return 0

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        sys.exit(self.outcome(args, prog_name))


def run_secrets(args: list[str]) -> list[str]:
    """This run's secrets: the passwords in its database and S3 endpoint URLs (flags and
    environment) and the S3 secret key."""
    urls = [os.environ.get(name) for name in URL_ENV]
    for i, arg in enumerate(args):
        if arg == "--database-url" and i + 1 < len(args):
            urls.append(args[i + 1])
        elif arg.startswith("--database-url="):
            urls.append(arg.partition("=")[2])
    secrets = [secret for url in urls for secret in url_secrets(url)]
    return secrets + [v for v in (os.environ.get(name) for name in SECRET_ENV) if v]


def masked(text: str) -> str:
    """``text`` with this run's secrets masked."""
    return mask_secrets(text, _SECRETS)


def one_line(message: str) -> str:
    """``message`` on one line, secrets masked."""
    return masked(" ".join(message.split()))


def report(message: str, code: int) -> int:
    """Print a failure's one line on stderr; return its exit code."""
    click.echo(one_line(message), err=True)
    return code


def fail(message: str, code: int) -> None:
    """Print a failure's one line on stderr and exit with ``code``."""
    sys.exit(report(message, code))


def emit(as_json: bool, data: Any, human: str | None = None) -> None:
    """JSON on stdout, or the human text."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    elif human is not None:
        click.echo(human)


def log(message: str) -> None:
    """A progress line on stderr."""
    click.echo(message, err=True)


def error_object(exc: Exception) -> dict[str, Any]:
    """``{"error": message, "exit_code": N}`` of a failed command, secrets masked."""
    code = exc.exit_code if isinstance(exc, RegistryError) else GENERIC
    message = str(exc) if isinstance(exc, RegistryError) else f"unexpected {type(exc).__name__}"
    return {"error": one_line(message), "exit_code": code}


def config(ctx: click.Context) -> Config:
    """The registry configuration, resolved when a command runs (so ``--help`` always works)."""
    return Config.from_env(**ctx.obj)


def open_registry(ctx: click.Context, create: bool = False, check_schema: bool = True):
    """The configured :class:`registry.service.Registry` (imports SQLAlchemy)."""
    from registry.service import Registry

    return Registry.open(config(ctx), create=create, check_schema=check_schema)


class _ResolutionType(click.ParamType):
    name = "RESOLUTION"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Resolution:
        if isinstance(value, Resolution):
            return value
        try:
            return Resolution.parse(value)
        except RegistryError as exc:
            self.fail(str(exc), param, ctx)


class _FiniteFloat(click.ParamType):
    """A float that is a real number: ``nan`` and ``inf`` are refused."""

    name = "FLOAT"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class _PositiveInt(click.ParamType):
    """An integer >= 1."""

    name = "N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            number = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not an integer", param, ctx)
        if number < 1:
            self.fail(f"{number} must be positive", param, ctx)
        return number


RESOLUTION = _ResolutionType()
STEPS = click.IntRange(min=1, max=MAX_STEPS)
FINITE = _FiniteFloat()
POSITIVE = _PositiveInt()

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON on stdout (logs go to stderr)."
)

"""The `afloc` command line: a thin Typer shell over the library.

Commands live in `afloc_cli/commands/`, one module each; this file only wires
them up and turns errors into one line and an exit code:
0 success, 2 usage or input error, 3 a batch where some items failed,
4 a compiled engine that failed its parity check against eager (nothing kept).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup
from typer.exceptions import TyperException

from afloc_cli import __version__
from afloc_cli.errors import AflocError


def _blank_flag_types(command: TyperCommand | TyperGroup, ctx: typer.Context) -> None:
    """Typer's Rich help (0.29) prints a value type after every option, flags too (`--json <bool>`), though a flag
    takes no value (`--json true` is a usage error). An empty metavar leaves the type out, as its plain help does."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


class _Command(TyperCommand):
    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        _blank_flag_types(self, ctx)
        super().format_help(ctx, formatter)


class _Group(TyperGroup):
    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        _blank_flag_types(self, ctx)
        super().format_help(ctx, formatter)


app = typer.Typer(
    cls=_Group,
    name="afloc",
    help="Annotation-free pathology localization in chest radiographs from free-text prompts (AFLoc).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"afloc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    if debug:
        os.environ["AFLOC_DEBUG"] = "1"


def _register() -> None:
    """Commands are registered here only once they are finished."""
    from afloc_cli.commands import (
        benchmark,
        compile,
        demo,
        export,
        import_reference,
        inspect,
        localize,
        merge,
        pretrain,
        scores,
        synth,
    )

    commands = {
        "localize": localize.localize_command,
        "scores": scores.scores_command,
        "export": export.export_command,
        "merge": merge.merge_command,
        "benchmark": benchmark.benchmark_command,
        "synth": synth.synth_command,
        "prepare": pretrain.prepare_command,
        "pretrain": pretrain.pretrain_command,
        "compile": compile.compile_command,
        "demo": demo.demo_command,
        "inspect": inspect.inspect_command,
        "import-reference": import_reference.import_reference_command,
    }
    for name, command in commands.items():
        app.command(name, cls=_Command)(command)


def run(argv: list[str]) -> int:
    """Run the CLI on `argv` and return the exit code (the tests call this directly)."""
    os.environ.pop("AFLOC_DEBUG", None)
    debug = "--debug" in argv
    try:
        result = app(args=argv, prog_name="afloc", standalone_mode=False)
        # Without standalone mode click returns a typer.Exit's code instead of raising it.
        if isinstance(result, int):
            return result
    except typer.Exit as exc:
        return int(getattr(exc, "exit_code", 0))
    except typer.Abort:
        typer.echo("afloc: aborted", err=True)
        return 130
    except TyperException as exc:  # usage errors: bad option, missing argument, unknown command
        if hasattr(exc, "show"):
            exc.show()
        return int(getattr(exc, "exit_code", 2))
    except AflocError as exc:
        if debug or os.environ.get("AFLOC_DEBUG"):
            traceback.print_exc()
        typer.echo(f"afloc: error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo("afloc: interrupted", err=True)
        return 130
    except OSError as exc:  # disk full, read-only or vanished paths: the file and the reason, on one line
        if debug or os.environ.get("AFLOC_DEBUG"):
            traceback.print_exc()
        typer.echo(f"afloc: error: {_os_error_line(exc)}", err=True)
        return AflocError.exit_code
    return 0


def _os_error_line(exc: OSError) -> str:
    """`PATH: reason` (both paths of a failed rename) from an OSError, without Python's decoration."""
    reason = exc.strerror or str(exc)
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    return f"{' -> '.join(names)}: {reason}" if names else reason


def main() -> None:
    sys.exit(run(sys.argv[1:]))


_register()

"""The CLI reference (docs/cli.md), generated from the Typer app so it cannot drift from the code.

    python -m afloc_cli.cli_reference > docs/cli.md

It shows what `--help` shows: each usage line as the command prints it, and help texts after Rich markup (Typer's
default markup mode), so an escaped `\\[` reads `[` here as it does on the terminal. A test regenerates it and
compares with the committed file; another checks it against the `--help` output itself.
"""

from __future__ import annotations

import inspect

import typer.main
from rich.text import Text

from afloc_cli.cli import app


def shown(text: str | None) -> str:
    """A help text as `--help` prints it (markup applied, indentation removed), each paragraph on one line."""
    text = inspect.cleandoc(text or "")
    if app.rich_markup_mode == "rich":
        text = Text.from_markup(text).plain
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in text.split("\n\n"))


def usage(name: str) -> str:
    """`afloc NAME ...` exactly as the command's `--help` prints it after `Usage: `."""
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    ctx = command.context_class(command, info_name=f"afloc {name}")
    return command.get_usage(ctx).removeprefix("Usage:").strip()


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render() -> str:
    group = typer.main.get_command(app)
    lines = ["# afloc command reference", "", "Generated from the Typer app by "
             "`python -m afloc_cli.cli_reference > docs/cli.md`; a test keeps it in sync with `--help`.", "",
             "Usage lines are those `--help` prints: `{name}` is a required argument, `[OPTIONS]` the options in "
             "the table.", ""]
    for name in sorted(group.commands):  # type: ignore[attr-defined]
        command = group.commands[name]  # type: ignore[attr-defined]
        lines += [f"## afloc {name}", "", shown(command.help), "", f"`{usage(name)}`", ""]
        lines += ["| argument / option | default | help |", "|---|---|---|"]
        for p in command.params:
            if p.name == "help":
                continue
            label = p.name.upper() if p.param_type_name == "argument" else ", ".join(p.opts)
            if getattr(p, "secondary_opts", None):
                label += " / " + ", ".join(p.secondary_opts)
            default = "required" if p.required else ("" if p.default in (None, ()) else p.default)
            text = " ".join(shown(getattr(p, "help", "")).split())  # one table cell: --help joins paragraphs too
            lines.append(f"| `{_cell(label)}` | {_cell(default)} | {_cell(text)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")

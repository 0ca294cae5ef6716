"""The CLI reference (docs/cli.md), generated from the Typer app so it cannot drift from the code.

    python -m afloc_cli.cli_reference > docs/cli.md

A test regenerates it and compares with the committed file.
"""

from __future__ import annotations

import typer.main

from afloc_cli.cli import app


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render() -> str:
    group = typer.main.get_command(app)
    lines = ["# afloc command reference", "", "Generated from the Typer app by "
             "`python -m afloc_cli.cli_reference > docs/cli.md`; a test keeps it in sync.", ""]
    for name in sorted(group.commands):  # type: ignore[attr-defined]
        command = group.commands[name]  # type: ignore[attr-defined]
        lines += [f"## afloc {name}", "", (command.help or "").strip(), ""]
        args = [p for p in command.params if p.param_type_name == "argument"]
        if args:
            usage = " ".join(p.name.upper() + ("..." if p.nargs == -1 else "") for p in args)
            lines += [f"`afloc {name} {usage} [OPTIONS]`", ""]
        lines += ["| argument / option | default | help |", "|---|---|---|"]
        for p in command.params:
            if p.name == "help":
                continue
            label = p.name.upper() if p.param_type_name == "argument" else ", ".join(p.opts)
            if getattr(p, "secondary_opts", None):
                label += " / " + ", ".join(p.secondary_opts)
            default = "required" if p.required else ("" if p.default in (None, ()) else p.default)
            lines.append(f"| `{_cell(label)}` | {_cell(default)} | {_cell(getattr(p, 'help', '') or '')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")

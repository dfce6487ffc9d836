"""Entry point: registers the commands and turns every failure into one clear line."""

from __future__ import annotations

import sys

from rich.markup import escape

from recu_cli.app import DEBUG, app, err_console
from recu_cli.commands import register_all
from recu_cli.errors import RecuError

register_all()


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; exit 2 for input errors, 1 for runtime failures, 130 on Ctrl-C."""
    args = sys.argv[1:] if argv is None else argv
    DEBUG["enabled"] = "--debug" in args
    try:
        _command()(args=args, prog_name="recu", standalone_mode=False)
    except RecuError as e:
        if DEBUG["enabled"]:
            err_console.print_exception()
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - last resort: one line unless --debug
        _exit_for_click(e)
        if DEBUG["enabled"]:
            raise
        err_console.print(
            f"[bold red]error:[/] {type(e).__name__}: {escape(str(e))} "
            "(rerun with --debug for a traceback)",
            soft_wrap=True,
        )
        sys.exit(1)
    sys.exit(0)


def _command():
    """The click command tree, with switches shown bare in --help (no `<bool>` metavar)."""
    import typer

    command = typer.main.get_command(app)
    stack = [command]
    while stack:
        cmd = stack.pop()
        stack.extend(getattr(cmd, "commands", {}).values())
        for param in cmd.params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        cmd.get_help_option = _bare_help(cmd.get_help_option)
    return command


def _bare_help(get_help_option):
    def wrapped(ctx):
        option = get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    return wrapped


def _exit_for_click(e: Exception) -> None:
    """Click's (or Typer's vendored click's) own exceptions, matched by shape, not class."""
    name = type(e).__name__
    if name == "Exit":
        sys.exit(getattr(e, "exit_code", 0))
    if name == "Abort":
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)
    if hasattr(e, "format_message") and hasattr(e, "exit_code"):
        if not e.format_message():  # help was shown (no arguments): nothing to add
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        hint = ""
        if ctx is not None and getattr(ctx, "info_name", None):
            hint = (
                " (see 'recu --help')"
                if ctx.parent is None
                else f" (see 'recu {ctx.info_name} --help')"
            )
        err_console.print(f"[bold red]error:[/] {escape(e.format_message())}{hint}", soft_wrap=True)
        sys.exit(e.exit_code)

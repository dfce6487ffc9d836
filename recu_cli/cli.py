"""Entry point: registers the commands and turns every failure into one clear line."""

from __future__ import annotations

import sys

import click

from recu_cli.app import DEBUG, app, err_console
from recu_cli.commands import register_all
from recu_cli.errors import RecuError

register_all()


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; exit 2 for input errors, 1 for runtime failures, 130 on Ctrl-C."""
    args = sys.argv[1:] if argv is None else argv
    DEBUG["enabled"] = "--debug" in args
    try:
        app(args=args, prog_name="recu", standalone_mode=False)
    except RecuError as e:
        if DEBUG["enabled"]:
            err_console.print_exception()
        err_console.print(f"[bold red]error:[/] {e}", markup=True, soft_wrap=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.UsageError as e:
        hint = f" (see 'recu {e.ctx.info_name} --help')" if e.ctx and e.ctx.info_name else ""
        if e.ctx is not None and e.ctx.parent is None:
            hint = " (see 'recu --help')"
        err_console.print(f"[bold red]error:[/] {e.format_message()}{hint}", soft_wrap=True)
        sys.exit(2)
    except click.exceptions.ClickException as e:
        err_console.print(f"[bold red]error:[/] {e.format_message()}", soft_wrap=True)
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - last resort: one line unless --debug
        if DEBUG["enabled"]:
            raise
        err_console.print(
            f"[bold red]error:[/] {type(e).__name__}: {e} (rerun with --debug for a traceback)",
            markup=True, soft_wrap=True,
        )
        sys.exit(1)
    sys.exit(0)

"""The ``rcomp`` command line: parse -> config -> stage -> print.

Every stage command is built from its config's option declarations (:mod:`rcomp.cli.build`);
``info``, ``run`` and ``demo`` are declared the same way. No module here imports torch at import
time, so ``rcomp --help`` stays fast and bad option values are refused before torch loads.
"""

from __future__ import annotations

import os
import sys

import typer

from rcomp import __version__
from rcomp.errors import RcompError

HELP = """Compress PyTorch image classifiers and measure and restore their adversarial robustness.

Every stage reads and writes safetensors checkpoints and prints the output path on stdout,
so stages chain in pipelines:

\b
  rcomp prune model.safetensors --ratio 0.5 | rcomp finetune --data digits --adv pgd --eps 0.1 \\
    | rcomp bench --data digits --attack fgsm,pgd --eps 0.1

Exit codes: 0 success, 1 a --fail-under threshold was missed or a training run diverged,
2 bad input or usage. Add --debug anywhere for a traceback on errors.
"""

app = typer.Typer(
    name="rcomp",
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        print(f"rcomp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
):
    """rcomp: compress, attack, fine-tune and benchmark image classifiers."""


def _register() -> None:
    from rcomp.cli import commands, demo, info, run

    info.register(app)
    commands.register(app)
    run.register(app)
    demo.register(app)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app, turning errors into one line and an exit code."""
    from typer._click.exceptions import ClickException
    from typer.exceptions import Abort, Exit

    from rcomp.signals import install_handlers, interrupted
    from rcomp.text import printable

    install_handlers()  # SIGTERM cleans up like Ctrl-C: no temporary file left, exit 143
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("RCOMP_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        rv = app(args=args, prog_name="rcomp", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except RcompError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"rcomp: error: {_one_line(printable(str(exc), limit=None))}", file=sys.stderr)
        code = exc.exit_code
    except Exit as exc:
        code = exc.exit_code
    except Abort:
        print("rcomp: interrupted; no output was written", file=sys.stderr)
        code = 130
    except KeyboardInterrupt as exc:  # Ctrl-C (130) or SIGTERM (143)
        code = interrupted(exc)
    except ClickException as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"rcomp: error: {_one_line(printable(exc.format_message(), limit=None))} "
              f"(see rcomp {_command(args)}--help)", file=sys.stderr)
        code = 2
    except BrokenPipeError:  # e.g. `rcomp info X | head`: the reader left, which is fine
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
    except Exception as exc:  # an unexpected failure: still one line, unless --debug
        if debug:
            raise
        print(f"rcomp: error: an internal error ({type(exc).__name__}) stopped the command; nothing was written. "
              "Rerun with --debug for a traceback and report it.", file=sys.stderr)
        code = 2
    sys.stdout.flush()
    sys.exit(code)


def _command(args: list[str]) -> str:
    from rcomp.stages import STAGES

    first = next((a for a in args if not a.startswith("-")), "")
    return f"{first} " if first in (*STAGES, "info", "run", "demo") else ""


def _one_line(msg: str) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= 600 else msg[:597] + "..."

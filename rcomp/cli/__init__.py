"""The ``rcomp`` command line: a thin Typer layer over the Python API.

Each command lives in its own module here; none imports torch at import time, so
``rcomp --help`` and ``rcomp info`` stay fast.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import typer

from rcomp import __version__
from rcomp.errors import RcompError

HELP = """Compress PyTorch image classifiers and measure and restore their adversarial robustness.

Every stage reads and writes safetensors checkpoints and prints the output path on stdout,
so stages chain in pipelines:

  rcomp prune model.safetensors --ratio 0.5 | rcomp finetune --data digits --adv pgd --eps 0.1 \\
    | rcomp bench --data digits --attack fgsm,pgd --eps 0.1

Exit codes: 0 success, 1 a --fail-under threshold was missed, 2 bad input or usage.
Add --debug anywhere for a traceback on errors.
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

# command name -> module under rcomp.cli (function of the same name, '-' -> '_')
COMMANDS = ["info", "convert", "prune", "quantize", "finetune", "attack", "bench", "run", "demo"]


def _version(value: bool):
    if value:
        print(f"rcomp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
):
    """rcomp: compress, attack, fine-tune and benchmark image classifiers."""


for _name in COMMANDS:
    _path = Path(__file__).with_name(f"{_name}.py")
    if _path.exists():
        _mod = importlib.import_module(f"rcomp.cli.{_name}")
        _fn = getattr(_mod, _name.replace("-", "_"))
        app.command(_name, help=_fn.__doc__, no_args_is_help=False)(_fn)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app, turning errors into one line and an exit code."""
    from typer._click.exceptions import ClickException
    from typer.exceptions import Abort, Exit

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
        print(f"rcomp: error: {_one_line(str(exc))}", file=sys.stderr)
        code = exc.exit_code
    except Exit as exc:
        code = exc.exit_code
    except Abort:
        print("rcomp: interrupted; no output was written", file=sys.stderr)
        code = 130
    except ClickException as exc:
        if debug:
            import traceback

            traceback.print_exc()
        exc.show()
        code = 2 if exc.exit_code not in (0,) else 0
    except KeyboardInterrupt:
        print("rcomp: interrupted; no output was written", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # e.g. `rcomp info X | head`: the reader left, which is fine
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
    except Exception as exc:  # an unexpected failure: still one line, unless --debug
        if debug:
            raise
        print(f"rcomp: error: {type(exc).__name__}: {_one_line(str(exc))} (rerun with --debug for a traceback)",
              file=sys.stderr)
        code = 2
    sys.stdout.flush()
    sys.exit(code)


def _one_line(msg: str) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= 600 else msg[:597] + "..."

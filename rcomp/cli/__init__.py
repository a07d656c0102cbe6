"""The ``rcomp`` command line: parse -> config -> stage -> print.

Every stage command is built from its config's option declarations (:mod:`rcomp.cli.build`);
``info``, ``run`` and ``demo`` are declared the same way. No module here imports torch at import
time, so ``rcomp --help`` stays fast and bad option values are refused before torch loads.
"""

from __future__ import annotations

import contextlib
import os
import sys

import typer

from rcomp import __version__
from rcomp.errors import AlreadyReported, RcompError

HELP = """Compress PyTorch image classifiers and measure and restore their adversarial robustness.

Every stage reads and writes safetensors checkpoints and prints the output path on stdout,
so stages chain in pipelines:

\b
  rcomp prune model.safetensors --ratio 0.5 | rcomp finetune --data digits --adv pgd --eps 0.1 \\
    | rcomp bench --data digits --attack fgsm,pgd --eps 0.1

Exit codes: 0 success, 1 a --fail-under threshold was missed or a training run diverged,
2 bad input or usage, 130 Ctrl-C, 143 SIGTERM, 141 the reader of stdout went away.
Add --debug anywhere for a traceback on errors.
"""

app = typer.Typer(
    name="rcomp",
    help=HELP,
    no_args_is_help=True,
    add_completion=True,
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


#: exit code when the reader of stdout went away (``rcomp info X | head -1``): 128 + SIGPIPE, as a
#: command killed by SIGPIPE would give; nothing more is printed.
EXIT_PIPE = 141


class StdoutFailed(Exception):
    """Writing to stdout failed (the reader left, or stdout is a full device)."""

    def __init__(self, exc: OSError):
        super().__init__(exc.strerror or str(exc))
        self.errno = exc.errno


class _Stdout:
    """sys.stdout, with a failed write or flush raised as :class:`StdoutFailed` (not an OSError that
    could be mistaken for a file's error, nor typer's broken-pipe handling, which exits 1)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as exc:
            raise StdoutFailed(exc) from None

    def flush(self):
        try:
            return self._stream.flush()
        except OSError as exc:
            raise StdoutFailed(exc) from None

    def __getattr__(self, name):
        return getattr(self._stream, name)


#: commands that time latency (bench, and the recipes whose bench stages do): OpenMP threads wait passively
TIMES_LATENCY = ("bench", "run", "demo")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app, turning errors into one line and an exit code."""
    from rcomp.signals import install_handlers

    install_handlers()  # SIGTERM cleans up like Ctrl-C: no temporary file left, exit 143
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("RCOMP_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    if next((a for a in args if not a.startswith("-")), "") in TIMES_LATENCY and "torch" not in sys.modules:
        # busy-waiting OpenMP threads skew latency on a loaded machine (eager batch 1: 1316 ms -> 64 ms with
        # PASSIVE, docs/export.md); the policy must be set before torch loads, and bench reports it
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import warnings

    from rcomp.deprecations import spare_users, users_spared

    spare_users(not debug)
    real_stdout = sys.stdout
    sys.stdout = _Stdout(real_stdout)
    try:
        try:
            with warnings.catch_warnings():  # scoped: an in-process caller (the tests) keeps its own filters
                if users_spared():  # library warnings (torchvision, PIL, torch.ao deprecations) are not the user's to act on
                    for module in ("torch", "torchvision", "PIL", "torch_pruning", "safetensors", "onnx", "onnxruntime",
                                   "onnxscript", "timm", "torchao"):
                        warnings.filterwarnings("ignore", module=rf"{module}(\..*)?$")
                    warnings.simplefilter("ignore", DeprecationWarning)
                    warnings.simplefilter("ignore", FutureWarning)
                elif debug:  # --debug: show deprecations (Python's defaults show them only for __main__)
                    warnings.simplefilter("default", DeprecationWarning)
                try:
                    _check_environment()
                    code = _invoke(args)
                finally:
                    spare_users(False)
            sys.stdout.flush()
        except StdoutFailed as exc:
            code = _stdout_failed(exc, real_stdout)
        except (Exception, KeyboardInterrupt) as exc:
            if debug and not isinstance(exc, KeyboardInterrupt):
                import traceback

                traceback.print_exc()
            code = _exit_code(exc, args)
    finally:
        sys.stdout = real_stdout
    if code == 0 and argv is None:  # the process's own run is done and said: a late Ctrl-C (while the
        import signal  # interpreter frees the models) must not turn a written output into an exit by SIGINT

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


def _invoke(args: list[str]) -> int:
    """Run the command without typer's own error handling, which turns Ctrl-C and SIGTERM alike into
    exit 130 without a word and a broken pipe into exit 1: rcomp says what happened itself."""
    from typer.main import get_command

    cmd = get_command(app)
    with cmd.make_context("rcomp", list(args)) as ctx:
        rv = cmd.invoke(ctx)
    return rv if isinstance(rv, int) else 0


def _check_environment() -> None:
    """What every command needs from its environment, checked before any work."""
    from rcomp.io.format import check_source_date_epoch

    try:
        os.getcwd()
    except OSError:
        raise RcompError("the current directory no longer exists (it was deleted or moved); cd to an existing "
                         "folder and rerun") from None
    check_source_date_epoch()


def _stdout_failed(exc: StdoutFailed, real_stdout) -> int:
    """The reader of stdout left (exit 141, quietly), or stdout cannot be written (one line, exit 2)."""
    import errno

    with contextlib.suppress(OSError, ValueError, AttributeError):  # no second error at interpreter exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), real_stdout.fileno())
    if exc.errno == errno.EPIPE:
        return EXIT_PIPE
    print(f"rcomp: error: standard output cannot be written ({exc}); the results were not printed: "
          "give stdout a file or pipe that can take them", file=sys.stderr)
    return 2


def _exit_code(exc: BaseException, args: list[str]) -> int:
    """Say what went wrong in one line on stderr; return the exit code."""
    from typer._click.exceptions import ClickException
    from typer.exceptions import Abort, Exit

    from rcomp.signals import interrupt_in, interrupted
    from rcomp.text import printable

    if isinstance(exc, Exit):
        return exc.exit_code
    exc = interrupt_in(exc) or exc  # a library's error raised in place of Ctrl-C is the interrupt
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C (130) or SIGTERM (143)
        return interrupted(exc)
    if isinstance(exc, Abort):
        print("rcomp: interrupted; no output was written", file=sys.stderr)
        return 130
    if isinstance(exc, AlreadyReported):  # another process of the run said it
        return exc.exit_code
    if isinstance(exc, RcompError):
        msg, code = str(exc), exc.exit_code
    elif isinstance(exc, OSError) and exc.filename is not None:  # the file system refused a path
        msg, code = (f"cannot use {printable(str(exc.filename), 80)}: {exc.strerror or type(exc).__name__}; "
                     "check the path"), 2
    elif isinstance(exc, ClickException):
        msg, code = f"{exc.format_message()} (see rcomp {_command(args)}--help)", 2
    elif _out_of_memory(exc):
        msg, code = ("ran out of memory; nothing was written. Lower --batch-size (and -n), or check the input size "
                     "the model records (rcomp info)"), 2
    else:  # an unexpected failure: still one line; --debug printed the traceback
        msg, code = (f"an internal error ({type(exc).__name__}) stopped the command; nothing was written. "
                     "Rerun with --debug for a traceback and report it."), 2
    print(f"rcomp: error: {_one_line(printable(msg, limit=None))}", file=sys.stderr)
    return code


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: Python's MemoryError, torch's CPU allocator or CUDA's out-of-memory error."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def _command(args: list[str]) -> str:
    from rcomp.stages import STAGES

    first = next((a for a in args if not a.startswith("-")), "")
    return f"{first} " if first in (*STAGES, "info", "run", "demo") else ""


def _one_line(msg: str) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= 600 else msg[:597] + "..."

"""What a user of ``python -m monai.bundle run ...`` and of the command-line tools sees: ``--help``, options checked
before any work, and one-line errors.

Every workflow config calls :func:`setup` first in ``initialize`` (``"cli"`` item):

- ``--help true`` (or ``--help``) prints the workflow's overridable ids with their defaults and exits (status 0)
  before any work; without ``help`` MONAI would take it as one more override and run the workflow.
- Otherwise an uncaught error ends the process with **one line** on stderr, the innermost error of the chain
  (``ValueError: D/datalist.json has no cases in split 'tset' ...``) instead of MONAI's 60-80-line traceback
  whose last line is a ``RuntimeError: Failed to instantiate component`` wrapper. Set ``BRAINSYNTH_VERBOSE=1``
  for the full traceback.

The command-line tools (``phantom.py``, ``prepare_datalist.py``, ``brainsynth.py``, ``monailabel_bundles.py`` and
the maintainers' ``tools/reproduce.py``, ``benchmark.py``, ``figures.py``, ``tables.py``) start through :func:`run_tool`: an unknown option or
sub-command stops them at once with one line, before any work.
"""

from __future__ import annotations

import ast
import os
import sys

#: Environment variable that restores Python's full traceback.
VERBOSE_ENV = "BRAINSYNTH_VERBOSE"


def flag(value, name: str | None = None) -> bool:
    """A yes/no option as given on the command line: ``true``/``false`` (any case), ``1``/``0``, ``yes``/``no``, or
    a bool. ``python -m monai.bundle run ... --overwrite false`` hands the configs the *string* ``'false'``, which
    Python takes as true; every yes/no id of ``train.json`` and ``inference.json`` goes through this function, by
    their ``flags`` section (:func:`flags`).

    Raises:
        ValueError: any other value (the message names ``--name`` when given).
    """
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "1", "yes", "y"):
            return True
        if word in ("false", "0", "no", "n", ""):
            return False
        raise ValueError(f"{'--' + name + ' ' if name else ''}{value!r}: expected true or false")
    return bool(value)


def flags(**values) -> dict[str, bool]:
    """Each yes/no option of a config read by :func:`flag` (its id naming it in the error): the ``flags`` section,
    ``{"_target_": "scripts.runtime.command_line.flags", "overwrite": "@overwrite", ...}``, used as
    ``$@flags['overwrite']``."""
    return {name: flag(value, name) for name, value in values.items()}


def chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors behind it (``__cause__``, else ``__context__``), outermost first."""
    errors, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        errors.append(error)
        error = error.__cause__ or error.__context__
    return errors


def _raised_by_the_bundle(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}scripts{os.sep}" in tb.tb_frame.f_code.co_filename


def innermost(error: BaseException) -> BaseException:
    """The error to show: the innermost one of ``error``'s chain that the bundle's own code raised (its message
    names the file or option), else the innermost one."""
    errors = chain(error)
    ours = [e for e in errors if _raised_by_the_bundle(e)]
    return ours[-1] if ours else errors[-1]


def one_line(error: BaseException) -> str:
    """``"<Type>: <message>"`` of :func:`innermost`, its lines joined by spaces."""
    inner = innermost(error)
    text = " ".join(part.strip() for part in str(inner).splitlines() if part.strip())
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__


def _hook(previous):
    def hook(kind, error, traceback):
        if os.environ.get(VERBOSE_ENV) or issubclass(kind, KeyboardInterrupt):
            previous(kind, error, traceback)
        else:
            print(one_line(error), file=sys.stderr)

    hook.brainsynth = True
    return hook


def install_error_hook() -> None:
    """Make an uncaught error print :func:`one_line` (once per process; a no-op when already installed)."""
    if not getattr(sys.excepthook, "brainsynth", False):
        sys.excepthook = _hook(sys.excepthook)


def config_files(argv: list[str] | None = None) -> list[str]:
    """The ``--config_file`` value of a ``monai.bundle run`` command line, as a list of paths."""
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv):
        if arg.startswith("--config_file"):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            value = value.strip()
            if value.startswith("["):
                return [str(v) for v in ast.literal_eval(value)]
            return [v for v in value.split(",") if v]
    return []


def _given(argv: list[str]) -> dict[str, str]:
    """``{id: value}`` of the ``--id value`` / ``--id=value`` options of a command line."""
    given = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--") and len(arg) > 2:
            name, _, value = arg[2:].partition("=")
            if not _ and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
            given[name] = value
    return given


def workflow_help(files: list[str], argv: list[str] | None = None) -> str:
    """The overridable ids of the workflow made of ``files`` (later files override earlier ones): every top-level id
    whose value is a plain setting (number, string, boolean, null or a list of those), with the value this command
    line (``argv``) would use: the one it gives, else the default. The workflow's own steps (lists of expressions
    such as ``run``) and checks (``*_check``) are left out."""
    from monai.bundle import ConfigParser

    config = ConfigParser.load_config_files(files) if files else {}
    given = _given(argv or [])
    plain = (int, float, str, bool, type(None))
    rows = []
    for key, value in config.items():
        if key.startswith("+") or key in ("imports", "config_stack", "help", "initialize", "finalize"):
            continue
        steps = isinstance(value, list) and value and all(isinstance(v, str) and v.startswith("$") for v in value)
        if key.endswith("_check") or steps:
            continue
        if isinstance(value, plain) or (isinstance(value, list) and all(isinstance(v, plain) for v in value)):
            if key in given:
                value = given[key]
            elif isinstance(value, str) and value.startswith("$"):
                value = f"computed: {value[1:]}"
            rows.append((key, value))
    width = max((len(k) for k, _ in rows), default=0)
    lines = [f"workflow: {' + '.join(os.path.basename(f) for f in files) or '?'}",
             "override any id with --<id> <value>; the ids and their defaults:"]  # fmt: skip
    lines += [f"  --{k:<{width}}  {v!r}" for k, v in rows]
    lines.append(f"errors end in one line; set {VERBOSE_ENV}=1 for the full traceback")
    return "\n".join(lines)


#: Log messages that only repeat an error the one-line hook prints anyway (Ignite logs an engine's exception twice).
_REPEATED_ERRORS = ("Current run is terminating due to exception", "Engine run is terminating due to exception",
                    "Exception: ")
#: Warnings MONAI gives for settings the bundle uses knowingly (``Orientationd``'s ``labels`` default).
_KNOWN_WARNINGS = (r".*Orientationd.__init__:labels.*",)


def _not_a_repeated_error(record) -> bool:
    return not (record.levelname == "ERROR" and str(record.getMessage()).startswith(_REPEATED_ERRORS))


def quiet() -> None:
    """Keep a run's output to what a user needs (unless :data:`VERBOSE_ENV` is set): MONAI's warnings about settings
    the bundle uses knowingly are silenced, and Ignite's log lines that repeat an uncaught error are dropped from the
    console (the error itself ends the run in one line)."""
    import logging
    import warnings

    if os.environ.get(VERBOSE_ENV):
        return
    for pattern in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for handler in logging.getLogger().handlers:
        if _not_a_repeated_error not in handler.filters:
            handler.addFilter(_not_a_repeated_error)


#: Options of ``python -m monai.bundle run`` itself (its ``run`` function's parameters), not config ids.
MONAI_RUN_OPTIONS = ("run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking",
                     "args_file", "workflow_type", "workflow_name", "help")


def unknown_overrides(files: list[str], argv: list[str]) -> list[tuple[str, str | None]]:
    """The options of a ``monai.bundle run`` command line that name no id of the workflow's config ``files``, each
    with the closest id (or None): ``[("ckpt_pth", "ckpt_path")]``. A nested override (``train#dataloader#
    num_workers``) counts when its first part is an id; MONAI's own options (:data:`MONAI_RUN_OPTIONS`) count."""
    import difflib

    from monai.bundle import ConfigParser

    config = ConfigParser.load_config_files(files) if files else {}
    ids = {str(k).lstrip("+") for k in config} | set(MONAI_RUN_OPTIONS)
    wrong = []
    for name in _options(argv):
        first, *rest = name.split("#", 1)
        if first not in ids:
            close = difflib.get_close_matches(first, sorted(ids), n=1, cutoff=0.6)
            wrong.append((name, "#".join([close[0], *rest]) if close else None))
    return wrong


def _monai_bundle_run(argv: list[str]) -> bool:
    """Whether this process is ``python -m monai.bundle run ...`` (not a test or a script building a workflow)."""
    return argv[0].endswith(os.path.join("monai", "bundle", "__main__.py")) and "run" in argv[1:2]


def setup(help=False) -> None:
    """First step of every workflow's ``initialize``: ``help`` prints :func:`workflow_help` and exits (status 0);
    otherwise, on a ``monai.bundle run`` command line, an option that names no id of the workflow stops it in one
    line naming the closest id (:func:`unknown_overrides`, before any work), then :func:`install_error_hook`."""
    if help not in (False, None, "false", "False", 0):
        print(workflow_help(config_files(), sys.argv))
        sys.exit(0)
    if _monai_bundle_run(sys.argv):
        files = config_files()
        for name, close in unknown_overrides(files, sys.argv[2:]):
            hint = f"; did you mean --{close}?" if close else "; --help true lists them"
            sys.exit(f"unknown option --{name}: {' + '.join(os.path.basename(f) for f in files)} has no id "
                     f"{name!r}{hint}")
    quiet()
    install_error_hook()


def require_base(stack, base: str | list[str] = "train.json") -> None:
    """The guard of every overlay config (its ``+initialize``): an overlay given without the configs it stacks on
    (``stack``, its ``config_stack``, does not start with ``base``, one file or a list such as
    ``["train.json", "train_segmenter.json"]``) stops in one line naming the model zoo's list form to use."""
    bases = [base] if isinstance(base, str) else list(base)
    if not stack or list(stack[: len(bases)]) != bases:
        overlay = stack[-1] if stack else "this overlay"
        files = ",".join(f"'bundle/configs/{name}'" for name in [*bases, overlay])
        sys.exit(f"{overlay} is an overlay of {' + '.join(bases)} and cannot run alone; give "
                 f"{'both' if len(bases) == 1 else 'all of them'}, in the model zoo list form: "
                 f"--config_file \"[{files}]\"")


def _options(argv: list[str]) -> list[str]:
    """The ``--name`` / ``--name=value`` option names of a command line (``-``/``_`` alike, ``--noname`` kept)."""
    return [a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--") and len(a) > 2]


def check_options(component, argv: list[str], prog: str) -> None:
    """Stop a command-line tool before any work when its command line names an unknown sub-command or option.

    Args:
        component: the function ``fire.Fire`` will call, or a dict of sub-command name -> function.
        argv: the arguments after the program name.
        prog: the program's name, for the message.

    Raises:
        SystemExit: status 1 with one line naming the unknown option (or sub-command) and the known ones.
    """
    import inspect

    if "--help" in argv or "-h" in argv:
        return
    function = component
    if isinstance(component, dict):
        positional = [a for a in argv if not a.startswith("-")]
        if not positional or positional[0] not in component:
            given = positional[0] if positional else "nothing"
            sys.exit(f"{prog}: unknown sub-command {given!r}; expected one of {', '.join(component)}")
        function = component[positional[0]]
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    known = [name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for name in _options(argv):
        if name not in known and not (name.startswith("no") and name[2:] in known):
            sys.exit(f"{prog}: unknown option --{name}; the options are " + ", ".join(f"--{k}" for k in known))


def run_tool(component, **fire_options):
    """``fire.Fire(component)`` for the bundle's command-line tools: options checked first
    (:func:`check_options`), uncaught errors in one line (:func:`install_error_hook`)."""
    import fire

    check_options(component, sys.argv[1:], os.path.basename(sys.argv[0]))
    install_error_hook()
    # fire describes a command with IPython's inspector when IPython is installed (about 2 s of imports) and falls
    # back to its own when the import fails: make it fail, the help text is the same
    sys.modules.setdefault("IPython", None)
    return fire.Fire(component, **fire_options)

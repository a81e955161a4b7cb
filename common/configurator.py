"""The CONSTANTS block at the top of a lesson script becomes its command line (after nanoGPT's configurator).

    MAX_TRAIN_STEPS = 800  # optimizer updates            ->   --max-train-steps 800

Every UPPER_CASE name the block assigns is an option, whatever its right-hand side (``4 * 200`` works):
its value is read from the script *when main() runs*, and the comment beside it is its ``--help`` text.
A command-line value is read as what it looks like (a number, ``none``, else text; lists separated by
``|``, numbers by ``,``); the script's ``validate()`` then checks it, by name. A True/False constant
takes ``--fast-mode``, ``--no-fast-mode`` or ``--fast-mode false``; written in quotes in the file
(``"False"``, which Python reads as true) it is refused.
The environment variable DREAMBOOTH_MODEL stands in for ``--model``. Every override is remembered
with where it came from, and the run summary shows it. Two options are not constants and every script
takes them: ``--debug`` (full tracebacks) and ``--threads N`` (PyTorch's CPU threads, ``cfg.threads``).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import io
import os
import re
import sys
import tokenize
from pathlib import Path
from types import SimpleNamespace

from common.errors import LessonError

MODEL_ENV_VAR = "DREAMBOOTH_MODEL"


class Config(SimpleNamespace):
    """The constants of one run: ``cfg.MAX_TRAIN_STEPS``; ``cfg.SOURCES`` says where overrides came from."""

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k.isupper() and k != "SOURCES"}


def dashed(name: str) -> str:
    """MAX_TRAIN_STEPS -> --max-train-steps"""
    return "--" + name.lower().replace("_", "-")


def constants(script: str) -> list[tuple[str, str]]:
    """(NAME, comment) for each UPPER_CASE name assigned between the ``CONSTANTS`` banner and the next
    ``# ====`` line of the script (the whole file when it has no banner), in order."""
    source = Path(script).read_text(encoding="utf-8-sig")  # (a BOM, from some Windows editors: Python runs it)
    comments, start, end = {}, 0, 10**9
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments.setdefault(tok.start[0], tok.string.lstrip("# ").strip())
            if not start and "CONSTANTS" in tok.string:
                start = tok.start[0]
            elif start and end == 10**9 and tok.string.startswith("# ===") and tok.start[0] > start:
                end = tok.start[0]
    return [(node.targets[0].id, comments.get(node.end_lineno, comments.get(node.lineno, "")))
            for node in ast.parse(source).body
            if isinstance(node, ast.Assign) and start < node.lineno < end and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper()]


def parse_value(text: str, like):
    """A command-line string as the value it reads as; ``like`` (the script's value) only decides whether
    text is a list and whether a number-looking text stays text (prompts such as "1990")."""
    if isinstance(like, (tuple, list)):
        numbers = bool(like) and not isinstance(like[0], str)
        items = [s.strip() for s in text.split("," if numbers else "|") if s.strip()]
        return type(like)(parse_value(s, like[0] if numbers else "") for s in items)
    if text.strip().lower() == "none":
        return None
    if isinstance(like, str):
        return text
    for kind in (int, float):  # a number when it reads as one; validate() says if it must be whole
        try:
            number = kind(text)
        except ValueError:
            continue
        # a whole number beyond any float ("1" and 400 zeros) is the infinity it is to arithmetic, as "1e400" is
        return float(text) if kind is int and abs(number) > sys.float_info.max else number
    return text


YES, NO = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class _YesNo(argparse.Action):
    """A True/False constant: ``--fast-mode``, ``--no-fast-mode``, or ``--fast-mode false`` (yes/no, on/off, 1/0)."""

    def __init__(self, option_strings, dest, **kwargs):
        negated = [f"--no-{flag[2:]}" for flag in option_strings]
        super().__init__(option_strings + negated, dest, nargs="?", metavar="true|false", **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        word = "true" if value is None else str(value).strip().lower()
        if word not in YES + NO or (option_string.startswith("--no-") and value is not None):
            parser.error(f"argument {option_string}: takes true or false, or nothing, got {value!r}")
        setattr(namespace, self.dest, (word in YES) != option_string.startswith("--no-"))



class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _format_action_invocation(self, action):
        if isinstance(action, _YesNo):  # "--fast-mode [true|false], --no-fast-mode"
            return f"{action.option_strings[0]} [true|false], {', '.join(action.option_strings[1:])}"
        return super()._format_action_invocation(action)


class _Parser(argparse.ArgumentParser):
    """argparse, except that a mistyped option ends like every other failure: one line saying what to do."""

    def __init__(self, *args, **kwargs):
        # Options are whole names: argparse would take '--lora-sca 0.5' as --lora-scale and a mistyped '--learning-rat'
        # as --learning-rate without a word, so what a student typed and what ran could differ unnoticed.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        # "--lora-scale -1e-3" is a value, not an option (argparse knows only "-1" and "-.5" as numbers)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.I)

    def error(self, message):
        options = [flag for action in self._actions for flag in action.option_strings]
        hints = [f"Did you mean {close[0]} instead of {flag}?" for flag in re.findall(r"--[\w-]+", message)
                 for close in [difflib.get_close_matches(flag.split("=")[0], options, n=1)]
                 if close and close[0] != flag.split("=")[0]]  # (a known option given a wrong value needs no hint)
        flag = re.match(r"argument (--[\w-]+)", message)
        if flag and "expected one argument" in message:  # (the value left out, or one that starts with "-")
            hints.append(f"Give it a value; a value that starts with '-' is joined to it: {flag[1]}=-value.")
        raise LessonError(f"command line: {message}. {' '.join(hints + [''])}"
                          f"'python {self.prog} --help' lists every option.")


def threads(text: str | None) -> int | None:
    """--threads N as a whole number >= 1 (None when not given)."""
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise LessonError(f"--threads must be a whole number >= 1 (the CPU threads PyTorch computes with), got "
                          f"{text!r}. Leave it out to use one per free core.")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if value > cores:  # (PyTorch starts them all: thousands stop the run with "can't start new thread", or crash)
        raise LessonError(f"--threads {value} is more than the {cores} CPU core(s) this computer gives the run: "
                          f"more threads than cores only wait for each other. Use --threads {cores} or fewer, or "
                          "leave it out to use one per free core.")
    return value


def configure(script_globals: dict, argv: list[str] | None, description: str | None, environ) -> Config:
    """Read the script's constants as they are now, apply ``argv`` (and DREAMBOOTH_MODEL), return a Config."""
    script = script_globals.get("__file__", sys.argv[0])
    names = constants(script)
    parser = _Parser(prog=Path(script).name, description=(description or "").strip().split("\n\n")[0],
                     epilog="Every option is a CONSTANT at the top of the script; the command line overrides it "
                            "for one run.", formatter_class=_HelpFormatter)
    for name, comment in names:
        value = script_globals[name]
        shown = " | ".join(map(str, value)) if isinstance(value, (tuple, list)) else repr(value)
        flags = [dashed(name)] + (["--model"] if name == "MODEL_ID" else [])
        if isinstance(value, str) and value.strip().lower() in YES[:2] + NO[:2]:
            raise LessonError(f"{name} = {value!r} is text in quotes; a yes/no setting is written True or False, "
                              "without quotes.")
        kind = dict(action=_YesNo) if isinstance(value, bool) else dict(metavar="VALUE")
        parser.add_argument(*flags, dest=name, default=None, help=f"{comment} [{name} = {shown}]".replace("%", "%%"),
                            **kind)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and library logs")
    parser.add_argument("--threads", metavar="N", help="CPU threads for PyTorch [default: one per core that "
                                                       "other programs leave free]")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    cfg = Config(SCRIPT=Path(script).name, DEBUG=args.debug, SOURCES={}, threads=threads(args.threads))
    for name, _ in names:
        value, given = script_globals[name], getattr(args, name)
        if given is not None:
            typed = [a.split("=")[0] for a in argv if a.split("=")[0] in (dashed(name), "--model")]
            cfg.SOURCES[name] = typed[-1] if typed and name == "MODEL_ID" else dashed(name)  # (the alias, if used)
        elif name == "MODEL_ID" and environ.get(MODEL_ENV_VAR):
            given, cfg.SOURCES[name] = environ[MODEL_ENV_VAR], MODEL_ENV_VAR
        setattr(cfg, name, value if given is None else given if isinstance(given, bool) else parse_value(given, value))
    return cfg

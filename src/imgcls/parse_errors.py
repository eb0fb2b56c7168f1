"""Command lines that do not parse, as one line: the flag, the value given, and what the flag takes.

jsonargparse reports a bad value as a block of a dozen lines (every type of a union, the errors of each, the value's
Python type) after a hundred lines of usage. ``one_line`` makes that ``--data.batch_size 0: expected an integer of
1 or more, or null``, with what the flag takes written from its type where the type says it in words, else the
first reason jsonargparse gives.
"""

import difflib
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from jsonargparse import ArgumentParser
from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
)

HELP = "train.py --help lists the flags"
NONE = type(None)
NOT_A_MAPPING = ("Problems parsing config", "Unexpected config")  # a config file that is not YAML, or not a mapping
WORDS = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    PositiveInt: "an integer of 1 or more",
    NonNegativeInt: "an integer of 0 or more",
    PositiveFloat: "a number above 0",
    NonNegativeFloat: "a number of 0 or more",
    OpenUnitInterval: "a number between 0 and 1, both excluded",
    ClosedUnitInterval: "a number from 0 to 1",
}
TYPE_REASON = re.compile(
    r"Expected an? <class '(?:[\w.]+\.)?(?P<class>\w+)'>|Not of type (?P<restricted>\w+): .*"
    r"|Expected a typing\.Literal\[(?P<literal>.*)\]"
)
# What jsonargparse says besides the reason: the union's members, the Python type of the value, the other readings
# it tried (a file path, a class path) and the value again.
NOISE = re.compile(
    r"Parser key \"[^\"]*\":|Does not validate against any of the Union subtypes|Subtypes: .*|Errors:"
    r"|Given value( type)?: .*|Expected a <class 'NoneType'>|Expected a path but .*|\. Got value: .*"
    r"|Type .*? expects a function or a callable class:|Problem with given class_path .*?:"
)


def one_line(message: str, parser: ArgumentParser, argv: list[str]) -> str:
    """jsonargparse's ``message`` for the command line ``argv`` as one line naming the flag or file at fault."""
    configs = _values(argv, "--config")
    if message.startswith("unrecognized arguments:"):
        return _unrecognized(message.split(":", 1)[1].split(), parser)
    if found := re.match(r"Problem in default config file '([^']*)': (.*)", message, re.S):
        if found[2].startswith(NOT_A_MAPPING):
            return _config_problem([found[1]], found[2]).removeprefix("--config ")
        return f"{found[1]}: {one_line(found[2], parser, [])}"
    if message.startswith(NOT_A_MAPPING):
        return _config_problem(configs, message)
    if found := re.match(r"Group '([^']*)' does not accept option '([^']*)'", message):  # in a config file
        return _no_such_flag(
            f"--{found[1]}.{found[2]}", parser, f", in --config {' '.join(configs)}" if configs else ""
        )
    keys = re.findall(r'Parser key "([^"]+)"', message)
    if not keys:  # argparse's own: "argument --ckpt_path: expected one argument"
        return f"{' '.join(message.split())} ({HELP})"
    flag = "--" + ".".join(keys[:2])  # a nested key: an argument of the class a flag names (--model.optimizer.lr)
    owner = re.search(r"class_path=? ?'([\w.]+)'", message)  # the value named a class: its arguments are at fault
    if len(keys) == 1 and (found := re.search(r"Option '([^']+)' is not accepted", message)):
        return f"{flag}.{found[1]}: {owner[1] if owner else flag} takes no such argument ({HELP})"
    if found := re.search(r"arguments are required: (.*)", message):
        needed = " ".join(f"{flag}.{name.strip()} VALUE" for name in found[1].split(","))
        return f"{flag} {owner[1] if owner else ''}: it needs {needed} ({HELP})".replace(" :", ":")
    given = _values(argv, flag) or re.findall(r"Given value: ([^\n]*?)(?:\. Got value: .*)?$", message, re.M)[:1]
    given = [value for value in given if not value.startswith(("Namespace(", "NestedArg("))]
    reason = _reason(message)
    if len(keys) == 1 and owner is None and reason.startswith(("expected", "not of type")):  # the value's type
        reason = f"expected {wants}" if (wants := _wants(_typehint(parser, flag))) else reason
    return f"{flag} {' '.join(given)}: {reason} ({HELP})".replace(" :", ":")


def _wants(hint: Any) -> str | None:
    """What a value of ``hint`` must be, in words; ``None`` for a type that words would not make clearer."""
    leaves = _leaves(hint)
    literals = [str(value) for leaf in leaves if get_origin(leaf) is Literal for value in get_args(leaf)]
    classes = [leaf.__name__ for leaf in leaves if _is_class(leaf)]
    words = [
        _words(leaf) for leaf in leaves if leaf is not NONE and get_origin(leaf) is not Literal and not _is_class(leaf)
    ]
    if None in words:
        return None
    found = [f"one of {', '.join(dict.fromkeys(literals))}"] if literals else []
    found += [f"the import path of a class ({' or '.join(dict.fromkeys(classes))})"] if classes else []
    return " or ".join(found + list(dict.fromkeys(words))) + (", or null" if NONE in leaves else "")


def _leaves(hint: Any) -> list[Any]:
    """The types a value of ``hint`` can take: a union's members, a list's items, what a callable returns."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (types.UnionType, Union):
        return [leaf for arg in args for leaf in _leaves(arg)]
    if origin is list or (origin is not None and origin.__name__ == "Callable"):  # list: jsonargparse appends one
        return _leaves(args[-1])
    return [hint]


def _words(hint: Any) -> str | None:
    if hint in WORDS:
        return WORDS[hint]
    args = get_args(hint)
    if get_origin(hint) is tuple and args and Ellipsis not in args and len(set(args)) == 1 and args[0] in WORDS:
        return f"a list of {len(args)} values, each {WORDS[args[0]]}"
    return None


def _is_class(hint: Any) -> bool:
    """A class that the value names by its import path (``torch.optim.SGD``), not a plain value's type."""
    return isinstance(hint, type) and get_origin(hint) is None and hint not in WORDS and hint is not NONE


def _reason(message: str) -> str:
    """jsonargparse's first reason, without the union's bookkeeping; another reading of the value only if alone."""
    lines = [NOISE.sub("", line).strip(" -") for line in message.splitlines()]
    lines = [re.sub(TYPE_REASON, _in_words, line) for line in lines if line]
    lines = [re.sub(r"File does not exist: .*", "no such file", line) for line in lines]  # the path, absolute
    lines = [re.sub(r"Path is not a file: .*", "not a file", line) for line in lines]
    direct = [line for line in lines if "dot import path" not in line] or lines
    return direct[0][0].lower() + direct[0][1:] if direct else "not valid"


def _in_words(found: re.Match) -> str:
    """jsonargparse's ``Expected a <class 'int'>``, ``Not of type PositiveInt: ...``, ``Expected a
    typing.Literal['a', 'b']`` in words: ``expected an integer``, ``... of 1 or more``, ``expected one of a, b``."""
    if found["literal"] is not None:
        return f"expected one of {found['literal'].replace(chr(39), '')}"
    name = found["class"] or found["restricted"]
    return f"expected {next((words for hint, words in WORDS.items() if hint.__name__ == name), f'a {name}')}"


def _typehint(parser: ArgumentParser, flag: str) -> Any:
    action = parser._option_string_actions.get(flag)
    return getattr(action, "_typehint", None)


def _values(argv: list[str], flag: str) -> list[str]:
    """The values ``argv`` gives ``flag`` (``--flag V``, ``--flag=V``, ``--flag+=V``)."""
    found = []
    for index, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if name.rstrip("+") == flag:
            found += [value] if equals else argv[index + 1 : index + 2]
    return found


def _unrecognized(args: list[str], parser: ArgumentParser) -> str:
    flags = [arg.partition("=")[0] for arg in args if arg.startswith("-")]
    if not flags:
        return f"{' '.join(args)}: train.py takes no positional arguments, only flags ({HELP})"
    return _no_such_flag(flags[0], parser)


def _no_such_flag(flag: str, parser: ArgumentParser, where: str = "") -> str:
    flags = [name for name in parser._option_string_actions if name.startswith("--")]
    close = difflib.get_close_matches(flag, flags, n=1, cutoff=0.8)
    return f"{flag}: no such flag{where}{f'; did you mean {close[0]}?' if close else ''} ({HELP})"


def _config_problem(configs: list[str], message: str) -> str:
    """The first of the ``configs`` files that is not a YAML mapping, and what it is instead."""
    for config in configs:
        try:
            content = yaml.safe_load(Path(config).read_text())
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            return f"--config {config}: not valid YAML ({error.problem}{where})"
        except (OSError, yaml.YAMLError) as error:
            return f"--config {config}: not readable ({error})"
        if not isinstance(content, dict):
            return f"--config {config}: not a mapping of options, such as 'data: {{batch_size: 32}}'"
    return f"--config {' '.join(configs)}: {' '.join(message.split())}"  # jsonargparse read it otherwise than PyYAML

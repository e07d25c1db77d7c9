"""The error types that mean "the user gave us something wrong", and the one "did you mean" hint.

The CLI turns a `UserError` into a one-line message on stderr and exit code 2 (no traceback);
anything else is an internal failure (exit code 1). Library code raises `UserError` (or
`ValueError` from config `__post_init__`, which the config loader re-raises as `ConfigError`)
with a message that names the field or file and says what was expected, and appends
`did_you_mean(name, choices)` when the name is close to a valid one.
"""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = ["UserError", "ConfigError", "HelpShown", "did_you_mean"]


class UserError(Exception):
    """Bad input: a config key, a file, a flag. Exit code 2 at the CLI."""


class ConfigError(UserError, ValueError):
    """A config value or key is invalid; the message starts with the dotted path."""


class HelpShown(Exception):
    """argparse printed --help (or --version): the command is done, exit code 0 at the CLI."""


def did_you_mean(name: object, choices: Iterable[object], *, cutoff: float = 0.6) -> str:
    """`"; did you mean 'x'?"` for the closest of `choices` to `name`, or `""` when none is close.

    `cutoff` is difflib's similarity ratio in [0, 1]; lower it for short or structured names
    (dotted config keys, metric paths) where one wrong part already costs a lot of ratio.
    """
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=cutoff)
    return f"; did you mean {close[0]!r}?" if close else ""

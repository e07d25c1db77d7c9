"""The one error type that means "the user gave us something wrong".

The CLI turns a `UserError` into a one-line message on stderr and exit code 2 (no traceback);
anything else is an internal failure (exit code 1). Library code raises `UserError` (or
`ValueError` from config `__post_init__`, which the config loader re-raises as `ConfigError`)
with a message that names the field or file and says what was expected.
"""


class UserError(Exception):
    """Bad input: a config key, a file, a flag. Exit code 2 at the CLI."""


class ConfigError(UserError, ValueError):
    """A config value or key is invalid; the message starts with the dotted path."""

"""The base of every error a user can fix (bad config key, missing file, wrong checkpoint):
the CLI prints its one-line message instead of a traceback."""

import importlib


class UserError(ValueError):
    """A problem with the user's input; str(e) is one line naming the problem and the fix."""


class ConfigError(UserError):
    """A config problem the user can fix; the message is one line naming the key."""


USER_ERRORS = (UserError,)


def require_extra(extra: str, *modules: str) -> None:
    """Import `modules` (an optional extra's packages); a missing one is a UserError naming the
    extra that brings it, e.g. `uvicorn is not installed: pip install -e ".[serve]"`."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UserError(
                f"{e.name or name} is not installed: install the '{extra}' extra (pip install -e \".[{extra}]\" in "
                f'a checkout, or pip install "WHEEL[{extra}]")'
            ) from None

"""The base of every error a user can fix (bad config key, missing file, wrong checkpoint):
the CLI prints its one-line message instead of a traceback."""


class UserError(ValueError):
    """A problem with the user's input; str(e) is one line naming the problem and the fix."""


class ConfigError(UserError):
    """A config problem the user can fix; the message is one line naming the key."""


USER_ERRORS = (UserError,)

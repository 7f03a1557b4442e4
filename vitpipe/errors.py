"""The one exception type for mistakes a user can fix (bad paths, values, datasets)."""


class UserError(ValueError):
    """Bad input from a user. The message names the bad value and the fix.

    The `vitpipe` command prints it as one line without a traceback and exits with status 2;
    everything else is a bug or an environment failure and keeps its traceback.
    """

"""The one exception type for problems a user can fix (bad spec, missing data, bad dataset layout).

The command line prints it as a single line and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the input and what to do."""

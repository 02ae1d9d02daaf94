"""The one exception type for problems a user can fix (bad spec, missing data, bad dataset layout).

The command line prints it as a single line and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the input and what to do."""


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM stopped the work; ``signal_number`` says which. What was finished
    is kept. The command line exits with 128 + the signal's number (130, 143), the shell's custom."""

    def __init__(self, signal_number: int, detail: str = ""):
        super().__init__(signal_number, detail)
        self.signal_number = signal_number
        self.detail = detail

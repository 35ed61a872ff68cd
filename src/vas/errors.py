"""The one exception type for bad user input.

Every error a user can cause (a missing model path, an empty prompt file, a bad ``k`` ...) is raised as
:class:`VasError` with a one-line message naming the problem; the CLI prints it and exits with status 2.
"""


class VasError(ValueError):
    """Bad input from the user: the message is one line and names the problem."""

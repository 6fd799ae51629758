"""User-facing errors: a FedsimError is printed as one line, without a traceback."""


class FedsimError(Exception):
    """A mistake the user can fix (a bad config value, missing data, a wrong path).

    The message names what is wrong and how to fix it; the CLI prints it and exits with status 2.
    """

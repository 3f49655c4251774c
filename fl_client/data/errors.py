"""The one exception type for a user's data mistakes."""


class DataError(ValueError):
    """A dataset, path or data parameter is wrong in a way the user can fix.

    The message is a single line naming the offending thing and what was expected,
    so command-line tools can print it instead of a traceback.
    """

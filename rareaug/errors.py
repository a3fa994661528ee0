"""One exception type for everything a user can fix; the CLI prints its message as one line, exit 2."""
from data_adapters import DataError, one_line  # noqa: F401  (one_line: the one error formatter, re-exported)


class RareaugError(Exception):
    """Bad input or a refused action. The message names the file or option and the fix."""


USER_ERRORS = (RareaugError, DataError)

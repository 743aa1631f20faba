"""One exception type for problems a user can fix.

The CLI turns a :class:`DiffkitError` into a one-line message and exit status 2; anything else is a
bug and keeps its traceback. Messages name the problem and the fix in one sentence.
"""


class DiffkitError(Exception):
    """Bad input or state that the user can correct (wrong path, unknown hook, corrupt shard...)."""

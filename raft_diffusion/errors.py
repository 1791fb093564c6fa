"""The one exception type for mistakes a user can fix (exit code 2 in `cli.py`)."""


class UserError(Exception):
    """A bad config, missing file or bad value. The message names the field and the fix."""

    def __init__(self, field: str, problem: str, fix: str | None = None):
        self.field, self.problem, self.fix = field, problem, fix
        msg = f"{field}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)

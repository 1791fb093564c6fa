"""The two exception types a run ends with on purpose (turned into exit codes in `cli.py` only).

`UserError` (exit 2): a bad config, missing file or bad value that the user can fix.
`RunFailed` (exit 1): the run itself went wrong (training diverged, every reward call failed);
nothing of the failing iteration is saved, so the last checkpoint stays good for `--resume`.
"""


class UserError(Exception):
    """A bad config, missing file or bad value. The message names the field and the fix."""

    def __init__(self, field: str, problem: str, fix: str | None = None):
        self.field, self.problem, self.fix = field, problem, fix
        msg = f"{field}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


class RunFailed(Exception):
    """A run stopped because its training or rewards failed. The message names the likely cause."""


def printable(line: str) -> str:
    """`line` with control and format characters escaped (a file name's terminal escape sequence,
    a prompt's right-to-left override), so a line shows what it names and nothing else."""
    import unicodedata

    return "".join(c if c == " " or unicodedata.category(c)[0] not in "CZ" else c.encode("unicode_escape").decode()
                   for c in line)

"""Errors raised by communicators: each names the collective, the rank and the group it failed in."""

from __future__ import annotations

from ..errors import UserError


class CollectiveError(UserError):
    """A collective failed (a peer died, ranks disagree on shapes, bad arguments).

    ``op``, ``rank`` and ``group`` say which collective, on which rank, in which group; the message
    names all three so that one line in a log from any rank is enough to find the fault. The
    command line exits with status 1 for it: a failed collective is a fault of the run, not of what
    the user typed.
    """

    exit_code = 1

    def __init__(self, message: str, *, op: str | None = None, rank: int | None = None,
                 group: str | None = None):
        super().__init__(message)
        self.op, self.rank, self.group = op, rank, group

    def __reduce__(self):  # keyword-only fields survive pickling (launch sends errors between processes)
        return (_rebuild, (type(self), self.args[0], self.op, self.rank, self.group))


class CollectiveTimeoutError(CollectiveError, TimeoutError):
    """A collective (or the rendezvous) did not complete within the communicator's timeout."""


def _rebuild(cls: type[CollectiveError], message: str, op: str | None, rank: int | None,
             group: str | None) -> CollectiveError:
    return cls(message, op=op, rank=rank, group=group)

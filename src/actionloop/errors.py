"""Exceptions, named by whose fault a failure is.

Each class carries the HTTP status the client sees and the kind it is
counted as in the `actionloop_errors_total` metric.

ActionLoopError                 root: the message, the status, the metric kind
├── RequestError                the client sent something we cannot use (400)
│   ├── Forbidden               not allowed: no code, a second init (403)
│   ├── TooLarge                a body over the limit (413)
│   └── TooSlow                 a body that stalled (408)
├── NoAction                    nothing initialised yet (500)
├── Unavailable                 no room now: try again later (503)
├── SourceError                 the auto-init code could not be had, or is not the expected code (502)
├── PrepareError                the action's code could not become a program (502)
├── StartError                  the action process did not start or get ready (502)
└── ActionError                 a started action broke during an activation (502)
    ├── ActionExited            the process died ("command exited", 400)
    ├── ActionTimeout           the process did not answer in time
    ├── BadResult               the result line is not a JSON object or array
    │   └── ResultTooLarge      the result line is over OW_MAX_RESULT
    └── Desync                  the action wrote a line that is no one's result

The messages of the OpenWhisk cases are part of the contract (contract part A):
invokers and the runtime test suite compare them byte for byte.
"""

from __future__ import annotations


class ActionLoopError(Exception):
    """A failure with the HTTP status and message the client should see."""

    status = 500
    kind = "other"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RequestError(ActionLoopError):
    """The request is unusable (bad JSON, bad base64)."""

    status = 400
    kind = "bad_request"


class Forbidden(RequestError):
    """The request is understood and refused (no code; a second /init)."""

    status = 403


class TooLarge(RequestError):
    """A request body over the configured limit."""

    status = 413
    kind = "too_large"


class TooSlow(RequestError):
    """A request body that stopped coming for longer than the body timeout."""

    status = 408
    kind = "slow_request"


class NoAction(ActionLoopError):
    """An activation arrived before any action was initialised."""

    status = 500
    kind = "no_action"

    def __init__(self) -> None:
        super().__init__("no action defined yet")


class Unavailable(ActionLoopError):
    """The runtime has no room for this now (too many processes, draining)."""

    status = 503
    kind = "unavailable"


class SourceError(ActionLoopError):
    """The auto-init file or URL could not be read, or its sha256 is not OW_AUTOINIT_SHA256."""

    status = 502
    kind = "source_failed"


class PrepareError(ActionLoopError):
    """Unpacking or compiling the action's code failed."""

    status = 502
    kind = "prepare_failed"


class StartError(ActionLoopError):
    """The action process could not start or exited before it was ready."""

    status = 502
    kind = "start_failed"


class ActionError(ActionLoopError):
    """A running action failed to answer an activation."""

    status = 502


class ActionExited(ActionError):
    """The action process died during an activation."""

    status = 400
    kind = "command_exited"

    def __init__(self) -> None:
        super().__init__("command exited")


class ActionTimeout(ActionError):
    """The action did not answer within the per-activation timeout."""

    kind = "timeout"


class BadResult(ActionError):
    """The action answered something other than a JSON object or array."""

    kind = "bad_result"

    def __init__(self, message: str = "The action did not return a dictionary or array.") -> None:
        super().__init__(message)


class ResultTooLarge(BadResult):
    """The action's result line is longer than OW_MAX_RESULT."""

    kind = "result_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"The action's result is larger than {limit} bytes.")


class Desync(ActionError):
    """The action wrote a line on fd 3 that is not the result it would be paired with."""

    kind = "desync"

    def __init__(self) -> None:
        super().__init__("The action wrote output on fd 3 that is not the result of this activation; it was restarted.")

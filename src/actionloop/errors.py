"""Exceptions, named by whose fault a failure is.

ActionLoopError                 root; carries the HTTP status and the message
├── RequestError                the client sent something we cannot use
├── PrepareError                the action's code could not become a program
├── StartError                  the action process did not start or get ready
└── ActionError                 a started action broke during an activation
    ├── ActionExited            the process died ("command exited")
    ├── ActionTimeout           the process did not answer in time
    └── BadResult               the result line is not a JSON object or array

The messages of the OpenWhisk cases are part of the contract (SPEC.md part A):
invokers and the runtime test suite compare them byte for byte.
"""

from __future__ import annotations


class ActionLoopError(Exception):
    """A failure with the HTTP status and message the client should see."""

    status = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class RequestError(ActionLoopError):
    """The request is unusable (bad JSON, missing code, bad base64)."""

    status = 400


class PrepareError(ActionLoopError):
    """Unpacking or compiling the action's code failed."""

    status = 502


class StartError(ActionLoopError):
    """The action process could not start or exited before it was ready."""

    status = 502


class ActionError(ActionLoopError):
    """A running action failed to answer an activation."""

    status = 502


class ActionExited(ActionError):
    """The action process died during an activation."""

    status = 400

    def __init__(self) -> None:
        super().__init__("command exited")


class Unstarted(ActionExited):
    """The process died while this activation's line still waited in its stdin:
    the action never began it, so it can be sent again to a new process."""


class ActionTimeout(ActionError):
    """The action did not answer within the per-activation timeout."""

    status = 502


class BadResult(ActionError):
    """The action answered something other than a JSON object or array."""

    def __init__(self) -> None:
        super().__init__("The action did not return a dictionary or array.")

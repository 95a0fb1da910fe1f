"""Counter: state kept across messages in one long-lived action process.

The module-level resource is opened once, when the process starts, and every
message reuses it: this is what a persistent connection to a database, Kafka
or a model looks like in a WebSocket-mode action.
"""

import os
import time


class Resource:
    """Stands in for an expensive connection: opened once per process."""

    def __init__(self):
        self.opened_at = time.time()
        self.pid = os.getpid()
        self.count = 0


RESOURCE = Resource()


def main(args):
    RESOURCE.count += 1
    return {"count": RESOURCE.count, "pid": RESOURCE.pid, "opened_at": RESOURCE.opened_at}

"""The same hello as a line loop, for websocketd: one JSON line in, one out."""

import json
import sys


def main():
    out = sys.stdout
    for line in sys.stdin:
        args = json.loads(line)
        out.write(json.dumps({"greeting": "Hello, " + args.get("name", "stranger") + "!"}) + "\n")
        out.flush()


main()

"""The benchmark's action: hello without logging (logs would measure the disk)."""


def main(args):
    return {"greeting": "Hello, " + args.get("name", "stranger") + "!"}

"""Hello: the smallest OpenWhisk action; logs the name and greets it."""


def main(args):
    name = args.get("name", "stranger") if isinstance(args, dict) else "stranger"
    print(f"hello called with name={name!r}")
    return {"greeting": f"Hello, {name}!"}

"""actionloop: an OpenWhisk ActionLoop runtime that also serves WebSockets."""

__version__ = "0.1.0"

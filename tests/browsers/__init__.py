"""Real browsers for tests/test_browsers.py: drivers (drivers.py) and a handshake recorder (recorder.py)."""

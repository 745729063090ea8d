"""A plug-in module that fails while it is imported (tests/test_plugins.py)."""
raise RuntimeError("kaboom")

"""A deep-learning project laid out by the ML lifecycle (see the README's lifecycle map)."""

__version__ = "0.1.0"

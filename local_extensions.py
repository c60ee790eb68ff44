"""Jinja filters for cookiecutter.json and template paths (loaded through `_extensions`)."""

import re

from cookiecutter.utils import simple_filter


@simple_filter
def safe_dirname(value):
    """The project folder's name, never a path: a bad slug must not create parent folders before the
    pre-generation hook rejects it (cookiecutter removes only the folder it made)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(value))
    return "_" if name in {"", ".", ".."} else name

"""Validate every answer before anything is written.

On a bad answer: one clear message naming the prompt and what is wrong, exit 1. Cookiecutter then
removes the project folder it created for this run, so nothing is left on disk.
"""

import json
import keyword
import re
import sys

# Rendered by cookiecutter: JSON escapes every quote and backslash, so any answer is safe here.
ANSWERS = json.loads(r"""{{ cookiecutter | tojson }}""")

CHOICES = {
    "python_version": ["3.10", "3.11", "3.12"],
    "license": ["MIT", "BSD-3-Clause", "Apache-2.0", "none"],
    "include_example": ["yes", "no"],
    "use_wandb": ["yes", "no"],
    "use_dvc": ["yes", "no"],
    "ci": ["github-actions", "none"],
}

# Modules the baked project (or its users) import: a package with one of these names would shadow it.
THIRD_PARTY = {
    "torch", "torchvision", "hydra", "omegaconf", "dvc", "wandb", "numpy", "scipy", "roma", "mitsuba",
    "drjit", "onnx", "onnxruntime", "fastapi", "starlette", "uvicorn", "httpx", "multipart", "pydantic",
    "yaml", "PIL", "pil", "matplotlib", "tqdm", "pytest", "ruff", "cookiecutter", "setuptools", "pip",
    "pkg_resources", "submitit", "pandas", "sklearn", "lightning", "pytorch_lightning", "jinja2",
    "tests", "test", "src", "configs",
}  # fmt: skip

SLUG = re.compile(r"^[a-z][a-z0-9]*([-_][a-z0-9]+)*$")
PACKAGE = re.compile(r"^[a-z_][a-z0-9_]*$")
EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


def problems(answers):
    """Yield (prompt, message) for each bad answer."""
    for key, choices in CHOICES.items():
        if answers[key] not in choices:
            yield key, f"{answers[key]!r} is not one of {', '.join(choices)}"

    if not answers["project_name"].strip():
        yield "project_name", "must not be empty"

    slug = answers["project_slug"]
    if not SLUG.match(slug):
        yield (
            "project_slug",
            f"{slug!r} is not a valid folder name: use lowercase letters, digits and single '-' or '_' "
            "between them, starting with a letter (e.g. 'pose-estimation')",
        )

    package = answers["package_name"]
    if not PACKAGE.match(package) or not package.isidentifier():
        yield (
            "package_name",
            f"{package!r} is not a Python package name: use lowercase letters, digits and '_', "
            "not starting with a digit (e.g. 'pose_estimation')",
        )
    elif keyword.iskeyword(package) or keyword.issoftkeyword(package):
        yield "package_name", f"{package!r} is a Python keyword"
    elif package in sys.stdlib_module_names:
        yield "package_name", f"{package!r} would shadow the standard-library module of that name"
    elif package in THIRD_PARTY or package.lower() in THIRD_PARTY:
        yield "package_name", f"{package!r} would shadow the module {package!r} that the project imports"

    if not EMAIL.match(answers["author_email"]):
        yield "author_email", f"{answers['author_email']!r} is not an e-mail address (name@domain.tld)"

    for key in ("project_name", "author_name", "description"):
        if any(ch in answers[key] for ch in '"\\') or any(ord(ch) < 32 for ch in answers[key]):
            yield key, f"{answers[key]!r} contains a quote, backslash or control character"


def main():
    found = list(problems(ANSWERS))
    for key, message in found:
        print(f"ERROR: {key}: {message}", file=sys.stderr)
    if found:
        print("Nothing was generated. Run cookiecutter again with corrected answers.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

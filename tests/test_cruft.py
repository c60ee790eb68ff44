"""Slow: a project made with cruft stays updatable: create, check, template change, update keeps local edits.

The template is a scratch git clone of this checkout's current state (cruft works from git commits), and
cruft runs the hooks inside its own temporary bakes: a hook that left a .git there would break the update.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEMPLATE

pytestmark = pytest.mark.slow

SLUG_DIR = "{{cookiecutter.project_slug|safe_dirname}}"
CRUFT = str(Path(sys.executable).parent / "cruft")
IDENTITY = {"GIT_AUTHOR_NAME": "T", "GIT_AUTHOR_EMAIL": "t@example.com"}
IDENTITY |= {"GIT_COMMITTER_NAME": "T", "GIT_COMMITTER_EMAIL": "t@example.com"}


def sh(*cmd, cwd, ok=True):
    env = {**os.environ, **IDENTITY, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert result.returncode == 0, f"{cmd}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


def scratch_template(root):
    """This checkout's files (committed or not, ignored ones excluded) as the first commit of a new repo."""
    listed = sh("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=TEMPLATE).stdout
    for name in filter(None, listed.split("\0")):
        source = TEMPLATE / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    sh("git", "init", "-q", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-q", "-m", "template v1", cwd=root)
    return sh("git", "rev-parse", "HEAD", cwd=root).stdout.strip()


def test_cruft_create_check_update_keeps_local_edits(tmp_path):
    template = tmp_path / "template"
    template.mkdir()
    first = scratch_template(template)
    out = tmp_path / "out"
    sh(CRUFT, "create", "--no-input", "--output-dir", str(out), str(template), cwd=tmp_path)
    project = out / "my-dl-project"
    assert not (project / ".git").exists(), "the hook must leave the repository to `make setup`"
    sh("make", "repo", "PYTHON=python", cwd=project)  # the repository step of `make setup`
    tracked = sh("git", "ls-files", cwd=project).stdout.split()
    assert ".cruft.json" in tracked and ".cookiecutter.json" in tracked
    assert json.loads((project / ".cruft.json").read_text())["commit"] == first
    assert json.loads((project / ".cookiecutter.json").read_text())["project_slug"] == "my-dl-project"
    sh(CRUFT, "check", cwd=project)

    # the user edits the project; the template moves on (a changed file, a new file)
    readme = project / "README.md"
    readme.write_text(readme.read_text() + "\nOur own notes.\n")
    sh("git", "commit", "-qam", "local notes", cwd=project)
    checklist = template / SLUG_DIR / "2_data" / "CHECKLIST.md"
    checklist.write_text(checklist.read_text() + "\n- [ ] A new item from the template.\n")
    (template / SLUG_DIR / "NEWS.md").write_text("# News for {{ cookiecutter.project_name }}\n")
    sh("git", "add", "-A", cwd=template)
    sh("git", "commit", "-qm", "template v2", cwd=template)
    second = sh("git", "rev-parse", "HEAD", cwd=template).stdout.strip()

    assert sh(CRUFT, "check", cwd=project, ok=False).returncode != 0, "cruft check missed the new commit"
    update = sh(CRUFT, "update", "-y", cwd=project)
    assert "Good work" in update.stdout or "success" in update.stdout.lower(), update.stdout
    assert "A new item from the template." in (project / "2_data" / "CHECKLIST.md").read_text()
    assert (project / "NEWS.md").read_text() == "# News for My DL Project\n"
    assert readme.read_text().endswith("Our own notes.\n")
    assert json.loads((project / ".cruft.json").read_text())["commit"] == second
    assert not list(project.rglob("*.rej")), list(project.rglob("*.rej"))
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "cruft update", cwd=project)
    sh(CRUFT, "check", cwd=project)
    # what separates the project from its template now is the user's edit, and nothing else (no .git/ blobs)
    diff = sh(CRUFT, "diff", cwd=project).stdout
    assert re.findall(r"^diff --git upstream-template-old/(\S+)", diff, flags=re.M) == ["README.md"], diff
    assert "+Our own notes." in diff or "-Our own notes." in diff

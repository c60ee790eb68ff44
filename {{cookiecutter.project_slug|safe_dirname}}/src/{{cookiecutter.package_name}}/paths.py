"""Where things are: the project root and the Hydra config tree.

Stage commands are run from the project root (Makefile, DVC); every output path comes from
the `paths` group of `configs/config.yaml`, so tests can point a whole stage at a temp folder
with `paths.root=/tmp/x`.
"""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(PROJECT_ROOT / "configs")

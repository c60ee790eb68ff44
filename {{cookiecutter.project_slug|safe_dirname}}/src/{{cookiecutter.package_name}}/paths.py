"""Where things are: the project root and the Hydra config tree.

Stage commands are run from the project root (Makefile, DVC); every output path comes from
the `paths` group of `configs/config.yaml`, so tests can point a whole stage at a temp folder
with `paths.root=/tmp/x`.
"""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(PROJECT_ROOT / "configs")


def group_defaults(name):
    """configs/<name>.yaml as a dict: a stage's settings are written once, in its config group. Values that
    interpolate the root config (`${paths...}`, `${seed}`) are left out: the command composing the whole
    config supplies them, a caller with a partial dict (a test, a notebook) names them."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / f"{name}.yaml"), resolve=False)

    def keep(value):
        if isinstance(value, dict):
            return {k: keep(v) for k, v in value.items() if not (isinstance(v, str) and "${" in v)}
        return value

    return keep(raw)

"""Object models as BOP datasets ship them: PLY variants, units, models_info.json computed from the meshes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from plyfile import PlyData, PlyElement

from {{ cookiecutter.package_name }}.data import models
from {{ cookiecutter.package_name }}.data.models import BopFormatError
from {{ cookiecutter.package_name }}.paths import PROJECT_ROOT

HALF = np.array([30.0, 20.0, 10.0])  # a 60 x 40 x 20 mm box
CORNERS = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float) * HALF
QUADS = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
DIAMETER = float(2 * np.linalg.norm(HALF))


def write_box(path, text=True, byte_order="<", normals=False, colours=False, texcoords=False, scale=1.0):
    props = [(k, "f4") for k in "xyz"]
    props += [(k, "f4") for k in ("nx", "ny", "nz")] if normals else []
    props += [(k, "u1") for k in ("red", "green", "blue")] if colours else []
    props += [(k, "f4") for k in ("texture_u", "texture_v")] if texcoords == "vertex" else []
    vertex = np.zeros(len(CORNERS), props)
    for i, k in enumerate("xyz"):
        vertex[k] = CORNERS[:, i] * scale
    if normals:
        for i, k in enumerate(("nx", "ny", "nz")):
            vertex[k] = CORNERS[:, i] / np.linalg.norm(CORNERS, axis=1)
    if colours:
        vertex["red"], vertex["green"], vertex["blue"] = 200, np.arange(8) * 30, 7
    face_props = [("vertex_indices", "i4", (4,))]
    face_props += [("texcoord", "f4", (8,))] if texcoords == "face" else []
    face = np.zeros(len(QUADS), face_props)
    face["vertex_indices"] = QUADS
    elements = [PlyElement.describe(vertex, "vertex"), PlyElement.describe(face, "face")]
    PlyData(elements, text=text, byte_order=byte_order).write(str(path))
    return path


VARIANTS = {
    "ascii, normals, no colour": dict(text=True, normals=True),
    "binary little endian, normals, no colour": dict(text=False, normals=True),
    "binary big endian, colours": dict(text=False, byte_order=">", colours=True),
    "ascii, vertex texture coordinates": dict(text=True, texcoords="vertex"),
    "binary, face texcoord list": dict(text=False, normals=True, texcoords="face"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ply_variants_read_the_same_mesh(tmp_path, variant):
    vertices, faces, colours = models.read_ply(write_box(tmp_path / "obj_000001.ply", **VARIANTS[variant]))
    np.testing.assert_array_equal(vertices, CORNERS)
    # quads are fan-triangulated: 12 triangles covering the 6 faces
    assert faces.shape == (12, 3) and faces[:2].tolist() == [[0, 1, 3], [0, 3, 2]]
    if VARIANTS[variant].get("colours"):
        assert colours.tolist()[1] == [200, 30, 7]
    else:
        assert colours is None
    assert models.diameter_mm(vertices) == pytest.approx(DIAMETER)


def test_a_truncated_ply_is_a_clear_error(tmp_path):
    path = write_box(tmp_path / "obj_000001.ply", text=False, normals=True)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(BopFormatError, match=r"obj_000001\.ply: unreadable PLY"):
        models.read_ply(path)


def dataset_models(tmp_path, info, scale=1.0, text=False):
    (tmp_path / "models").mkdir(exist_ok=True)
    write_box(tmp_path / "models" / "obj_000001.ply", text=text, normals=True, scale=scale)
    (tmp_path / "models" / "models_info.json").write_text(json.dumps(info))
    return tmp_path


def test_a_mesh_in_metres_is_an_error_naming_the_file(tmp_path):
    root = dataset_models(tmp_path, {"1": {"diameter": DIAMETER}}, scale=0.001)
    with pytest.raises(
        BopFormatError, match=r"obj_000001\.ply: the mesh spans 0\.0748\d* units .* in metres"
    ):
        models.load_model_points(root, 1)
    models.compute_models_info(root / "models", scale=1000)  # the explicit conversion: rewrites it in mm
    np.testing.assert_allclose(models.load_model_points(root, 1), CORNERS, rtol=1e-6)


def test_an_object_listed_without_a_mesh_is_an_error_only_when_used(tmp_path):
    root = dataset_models(tmp_path, {"1": {"diameter": DIAMETER}, "7": {"diameter": 50.0}})
    assert sorted(models.load_models_info(root)) == [1, 7]
    assert len(models.load_model_points(root, 1)) == 8
    with pytest.raises(BopFormatError, match=r"obj_000007\.ply: object 7 is listed in models_info\.json but"):
        models.load_model_points(root, 7)


def test_models_info_is_computed_from_the_meshes_keeping_declared_symmetries(tmp_path):
    symmetry = {"symmetries_continuous": [{"axis": [0, 0, 1], "offset": [0, 0, 0]}]}
    root = dataset_models(tmp_path, {"1": {"diameter": 1.0, **symmetry}}, text=True)
    infos = models.compute_models_info(root / "models")
    info = infos[1]
    assert info["diameter"] == pytest.approx(DIAMETER)
    assert [info[f"size_{a}"] for a in "xyz"] == pytest.approx(list(2 * HALF))
    assert [info[f"min_{a}"] for a in "xyz"] == pytest.approx(list(-HALF))
    assert info["symmetries_continuous"] == symmetry["symmetries_continuous"]
    assert models.load_models_info(root)[1]["diameter"] == pytest.approx(DIAMETER)  # written, readable


def test_a_missing_models_info_names_the_command_that_computes_it(tmp_path):
    root = dataset_models(tmp_path, {})
    (root / "models" / "models_info.json").unlink()
    with pytest.raises(
        BopFormatError, match=r"models_info\.json: file is missing; compute it .*\.data\.models data=bop"
    ):
        models.load_models_info(root)


def test_models_info_refuses_a_mesh_in_metres(tmp_path):
    root = dataset_models(tmp_path, {}, scale=0.001)
    (root / "models" / "models_info.json").unlink()
    with pytest.raises(BopFormatError, match=r"obj_000001\.ply: the mesh is 0\.0748\d* units across.*metres"):
        models.compute_models_info(root / "models")
    assert not (root / "models" / "models_info.json").exists()


@pytest.mark.slow
def test_models_command_writes_models_info(tmp_path):
    root = dataset_models(tmp_path, {}, scale=0.001)
    command = [sys.executable, "-m", "{{ cookiecutter.package_name }}.data.models", "data=bop", f"data.root={root}",
               f"paths.root={tmp_path}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")}
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=120)
    assert run.returncode == 1 and "metres" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run([*command, "data.models.scale=1000"], capture_output=True, text=True, env=env,
                         cwd=PROJECT_ROOT, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    info = json.loads((root / "models" / "models_info.json").read_text())
    assert info["1"]["diameter"] == pytest.approx(DIAMETER, rel=1e-5)

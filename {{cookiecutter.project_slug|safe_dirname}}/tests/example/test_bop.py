"""The BOP reader: round trip on a captured dataset, any-BOP features, and clear errors for bad files."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from {{ cookiecutter.package_name }}.data import bop
from {{ cookiecutter.package_name }}.data.bop import BopDataset, BopFormatError


@pytest.fixture
def dataset_copy(tiny_dataset, tmp_path):
    """A private copy of the tiny dataset to damage."""
    root = tmp_path / "dataset"
    shutil.copytree(tiny_dataset.root, root)
    return root


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_items_match_the_files(tiny_dataset):
    root = tiny_dataset.root
    dataset = BopDataset(root, "train", obj_id=1)
    scene_gt = json.loads((root / "train/000000/scene_gt.json").read_text())
    scene_camera = json.loads((root / "train/000000/scene_camera.json").read_text())
    scene_info = json.loads((root / "train/000000/scene_gt_info.json").read_text())
    assert len(dataset) == len(scene_gt) == 16
    item = dataset[3]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 32, 32)
    assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0
    png = np.array(Image.open(root / "train/000000/rgb/000003.png"))
    assert torch.equal((item["image"] * 255).round().byte(), torch.from_numpy(png).permute(2, 0, 1))
    gt = scene_gt["3"][0]
    assert torch.allclose(item["R"], torch.tensor(gt["cam_R_m2c"]).view(3, 3))
    assert torch.allclose(item["t"], torch.tensor(gt["cam_t_m2c"]))
    assert torch.allclose(item["K"], torch.tensor(scene_camera["3"]["cam_K"]).view(3, 3))
    assert torch.allclose(item["R"] @ item["R"].T, torch.eye(3), atol=1e-5)
    assert 150 < float(item["t"].norm()) < 400  # mm
    assert (item["obj_id"], item["scene_id"], item["im_id"], item["gt_id"]) == (1, 0, 3, 0)
    assert item["visib_fract"] == pytest.approx(scene_info["3"][0]["visib_fract"])
    assert item["rgb_path"].endswith("train/000000/rgb/000003.png")


def test_preload_and_resize(tiny_dataset):
    lazy = BopDataset(tiny_dataset.root, "val", obj_id=1)
    preloaded = BopDataset(tiny_dataset.root, "val", obj_id=1, preload=True)
    assert preloaded.images.dtype == torch.uint8 and preloaded.images.shape == (8, 3, 32, 32)
    for a, b in zip(lazy, preloaded, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["K"], b["K"])
    small = BopDataset(tiny_dataset.root, "val", obj_id=1, image_size=16, preload=True)
    item, full = small[0], lazy[0]
    assert item["image"].shape == (3, 16, 16)
    # the object centre lands on the same relative image position: u' + 0.5 = (u + 0.5) / 2
    uv = full["K"] @ full["t"]
    uv_small = item["K"] @ item["t"]
    assert torch.allclose(uv_small[:2] / uv_small[2] + 0.5, (uv[:2] / uv[2] + 0.5) / 2, atol=1e-4)
    batch = next(iter(torch.utils.data.DataLoader(small, batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["K"].shape == (4, 3, 3)


def test_models_info_symmetry_and_points(tiny_dataset):
    infos = bop.load_models_info(tiny_dataset.root)
    assert set(infos) == {1, 2}
    assert infos[1]["diameter"] == pytest.approx(111.34, abs=0.01)
    assert not bop.is_symmetric(infos[1]) and bop.is_symmetric(infos[2])
    vertices = bop.load_model_points(tiny_dataset.root, 1)
    assert vertices.shape[1] == 3 and len(vertices) > 100
    # diameter = the largest vertex distance, in mm
    dist = np.linalg.norm(vertices[:, None] - vertices[None], axis=-1).max()
    assert dist == pytest.approx(infos[1]["diameter"], rel=1e-5)
    subset = bop.load_model_points(tiny_dataset.root, 1, n=100)
    assert subset.shape == (100, 3) and np.array_equal(
        subset, bop.load_model_points(tiny_dataset.root, 1, n=100)
    )
    assert {tuple(p) for p in subset} <= {tuple(v) for v in vertices}
    more = bop.load_model_points(tiny_dataset.root, 1, n=len(vertices) + 500)
    assert more.shape == (len(vertices) + 500, 3)
    assert np.abs(more).max(0) == pytest.approx(np.abs(vertices).max(0))  # surface samples stay on the model


def test_reads_any_bop_layout(dataset_copy):
    """Several scenes, several instances per image (filtered by obj_id), gray/ .jpg images."""
    scene0 = dataset_copy / "train" / "000000"
    scene1 = dataset_copy / "train" / "000003"
    shutil.copytree(scene0, scene1)
    (scene1 / "gray").mkdir()
    for png in sorted((scene1 / "rgb").iterdir()):
        Image.open(png).convert("L").save(scene1 / "gray" / f"{png.stem}.jpg")
    shutil.rmtree(scene1 / "rgb")

    def add_second_instance(data):
        for instances in data.values():
            other = dict(instances[0], obj_id=2)
            instances.append(other)

    edit_json(scene1 / "scene_gt.json", add_second_instance)
    edit_json(scene1 / "scene_gt_info.json", lambda d: [v.append(dict(v[0])) for v in d.values()])

    ones = BopDataset(dataset_copy, "train", obj_id=1)
    assert len(ones) == 32 and {item["scene_id"] for item in ones} == {0, 3}
    gray = ones[16]
    assert gray["scene_id"] == 3 and gray["rgb_path"].endswith("gray/000000.jpg")
    assert torch.equal(gray["image"][0], gray["image"][1])  # gray replicated to 3 channels
    twos = BopDataset(dataset_copy, "train", obj_id=2)
    assert len(twos) == 16 and {(item["scene_id"], item["gt_id"]) for item in twos} == {(3, 1)}


def test_missing_file_is_named(dataset_copy):
    (dataset_copy / "train/000000/scene_camera.json").unlink()
    with pytest.raises(BopFormatError, match=r"train/000000/scene_camera\.json: file is missing"):
        BopDataset(dataset_copy, "train", obj_id=1)


def test_missing_image_is_named(dataset_copy):
    (dataset_copy / "val/000000/rgb/000002.png").unlink()
    with pytest.raises(BopFormatError, match=r"val/000000/rgb/000002\.png: image is missing"):
        BopDataset(dataset_copy, "val", obj_id=1)


def test_corrupt_image_is_named(dataset_copy):
    (dataset_copy / "val/000000/rgb/000001.png").write_bytes(b"not a png")
    dataset = BopDataset(dataset_copy, "val", obj_id=1)
    with pytest.raises(BopFormatError, match=r"val/000000/rgb/000001\.png: unreadable image"):
        dataset[1]


def test_malformed_json_is_named(dataset_copy):
    path = dataset_copy / "train/000000/scene_gt.json"
    path.write_text(path.read_text()[:-20])
    with pytest.raises(BopFormatError, match=r"scene_gt\.json: malformed JSON"):
        BopDataset(dataset_copy, "train", obj_id=1)


def test_missing_key_is_named(dataset_copy):
    edit_json(dataset_copy / "test/000000/scene_camera.json", lambda d: d["5"].pop("cam_K"))
    with pytest.raises(BopFormatError, match=r"scene_camera\.json: image 5 has no 'cam_K'"):
        BopDataset(dataset_copy, "test", obj_id=1)


def test_wrong_length_and_nan_are_named(dataset_copy):
    path = dataset_copy / "test/000000/scene_gt.json"
    edit_json(path, lambda d: d["2"][0].update(cam_R_m2c=[1, 0, 0]))
    with pytest.raises(BopFormatError, match=r"image 2 instance 0 cam_R_m2c has 3 numbers, expected 9"):
        BopDataset(dataset_copy, "test", obj_id=1)
    edit_json(
        path, lambda d: d["2"][0].update(cam_R_m2c=[1, 0, 0, 0, 1, 0, 0, 0, 1], cam_t_m2c=[0, "NaN", 1])
    )
    with pytest.raises(BopFormatError, match="NaN"):
        BopDataset(dataset_copy, "test", obj_id=1)


def test_translations_in_metres_are_caught(dataset_copy):
    def to_metres(data):
        for instances in data.values():
            for inst in instances:
                inst["cam_t_m2c"] = [x / 1000 for x in inst["cam_t_m2c"]]

    edit_json(dataset_copy / "train/000000/scene_gt.json", to_metres)
    with pytest.raises(BopFormatError, match=r"scene_gt\.json: image 0 instance 0: .*must be in mm"):
        BopDataset(dataset_copy, "train", obj_id=1)


def test_wrong_depth_scale_is_caught(dataset_copy):
    edit_json(
        dataset_copy / "train/000000/scene_camera.json",
        lambda d: [c.update(depth_scale=1.0) for c in d.values()],
    )
    with pytest.raises(BopFormatError, match=r"depth/000000\.png: median depth .*\(depth_scale wrong"):
        BopDataset(dataset_copy, "train", obj_id=1)


def test_unknown_object_and_split(dataset_copy):
    with pytest.raises(BopFormatError, match=r"models_info\.json: no object 7"):
        BopDataset(dataset_copy, "train", obj_id=7)
    with pytest.raises(BopFormatError, match=r"train_pbr: split folder is missing"):
        BopDataset(dataset_copy, "train_pbr", obj_id=1)
    with pytest.raises(BopFormatError, match="no instances of obj_id 2"):
        BopDataset(dataset_copy, "train", obj_id=2)


def test_bad_models_info_and_ply(dataset_copy):
    path = dataset_copy / "models" / "models_info.json"
    edit_json(path, lambda d: d["1"].pop("diameter"))
    with pytest.raises(BopFormatError, match=r"models_info\.json: object 1 has no 'diameter'"):
        bop.load_models_info(dataset_copy)
    (dataset_copy / "models" / "obj_000002.ply").write_bytes(b"solid stl\n")
    with pytest.raises(BopFormatError, match=r"obj_000002\.ply: not a PLY file"):
        bop.read_ply(dataset_copy / "models" / "obj_000002.ply")


def test_ascii_ply(tmp_path):
    path = tmp_path / "obj_000001.ply"
    path.write_text(
        "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
        "element face 1\nproperty list uchar int vertex_indices\nend_header\n0 0 0\n10 0 0\n0 10 0\n3 0 1 2\n"
    )
    vertices, faces, colors = bop.read_ply(path)
    assert vertices.tolist() == [[0, 0, 0], [10, 0, 0], [0, 10, 0]]
    assert faces.tolist() == [[0, 1, 2]] and colors is None


def test_binary_ply_with_quads_and_texcoords(tmp_path):
    """Mixed polygon sizes and a second list property per face (as in textured exports): fan triangulation."""
    header = (
        "ply\nformat binary_big_endian 1.0\nelement vertex 5\nproperty float x\nproperty float y\nproperty float z\n"
        "element face 2\nproperty list uchar int vertex_indices\nproperty list uchar float texcoord\nend_header\n"
    )
    vertices = np.array([[0, 0, 0], [10, 0, 0], [10, 10, 0], [0, 10, 0], [5, 5, 5]], ">f4")
    quad = np.array([4], ">u1").tobytes() + np.array([0, 1, 2, 3], ">i4").tobytes() + b"\x00"
    triangle = np.array([3], ">u1").tobytes() + np.array([0, 1, 4], ">i4").tobytes()
    triangle += np.array([2], ">u1").tobytes() + np.array([0.5, 0.5], ">f4").tobytes()
    path = tmp_path / "obj_000001.ply"
    path.write_bytes(header.encode() + vertices.tobytes() + quad + triangle)
    read_vertices, faces, _ = bop.read_ply(path)
    assert np.array_equal(read_vertices, vertices.astype(float))
    assert faces.tolist() == [[0, 1, 2], [0, 2, 3], [0, 1, 4]]

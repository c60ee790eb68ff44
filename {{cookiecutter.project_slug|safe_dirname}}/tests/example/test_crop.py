"""Zoom-in crops: exact intrinsics, pixel-exact resampling, the detections file and its errors."""

import json

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from {{ cookiecutter.package_name }}.data import crop
from {{ cookiecutter.package_name }}.data.bop import BopFormatError
from {{ cookiecutter.package_name }}.pose import geometry

# a real-looking camera: fx != fy, principal point off the centre, a 160 x 120 frame
K = np.array([[150.0, 0.0, 81.3], [0.0, 151.5, 58.6], [0.0, 0.0, 1.0]])


def test_crop_intrinsics_project_model_points_where_the_frame_does_shifted_and_scaled():
    rng = np.random.default_rng(0)
    points = rng.uniform(-40, 40, (200, 3))
    R = torch.tensor(Rotation.random(random_state=1).as_matrix())
    t = torch.tensor([12.0, -9.0, 420.0], dtype=torch.float64)
    uv = geometry.project(torch.tensor(points), R, t, torch.tensor(K))
    for window, size in (((70.2, 61.7, 48.0), 64), ((20.0, 100.0, 130.5), 32), ((80.0, 60.0, 20.0), 96)):
        cx, cy, side = window
        K_crop = crop.crop_intrinsics(K, window, size)
        uv_crop = geometry.project(torch.tensor(points), R, t, torch.tensor(K_crop))
        # frame pixel u lands at (u - left) * size / side - 0.5 (pixel centres at integers)
        expected = (uv - torch.tensor([cx - side / 2, cy - side / 2], dtype=torch.float64)) * (
            size / side
        ) - 0.5
        torch.testing.assert_close(uv_crop, expected, atol=1e-9, rtol=0)
        # the torch path (datasets) gives the same K as the numpy path (the service)
        torch.testing.assert_close(crop.crop_intrinsics(torch.tensor(K), window, size), torch.tensor(K_crop))


def test_crop_image_samples_the_frame_where_the_crop_intrinsics_say():
    """A frame whose pixels hold their own coordinates: every crop pixel must hold the frame coordinates
    that K_crop maps to it (bilinear sampling and averaging reproduce a linear ramp exactly)."""
    h, w = 120, 160
    v, u = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    frame = torch.stack([u, v, u + v])
    for window, size in (((70.2, 61.7, 48.0), 64), ((81.0, 60.0, 100.0), 32), ((50.5, 40.5, 16.0), 64)):
        K_crop = crop.crop_intrinsics(K, window, size)
        out = crop.crop_image(frame, window, size)
        assert out.shape == (3, size, size) and out.dtype == torch.float32
        jj, ii = np.meshgrid(np.arange(size), np.arange(size))
        # invert K_crop's affine pixel map through K: crop pixel (j, i) -> frame pixel
        frame_u = (jj - K_crop[0, 2]) * K[0, 0] / K_crop[0, 0] + K[0, 2]
        frame_v = (ii - K_crop[1, 2]) * K[1, 1] / K_crop[1, 1] + K[1, 2]
        np.testing.assert_allclose(out[0].numpy(), frame_u, atol=2e-3)
        np.testing.assert_allclose(out[1].numpy(), frame_v, atol=2e-3)


def test_crop_outside_the_frame_is_black_and_uint8_keeps_its_range():
    frame = torch.full((3, 20, 30), 200, dtype=torch.uint8)
    out = crop.crop_image(frame, (0.0, 0.0, 20.0), 10)  # centred on the corner: 3/4 of it outside
    assert out.max() == pytest.approx(200) and out[:, :4, :4].max() == 0 and out[:, 6:, 6:].min() == 200


def test_box_window_and_jitter():
    assert crop.box_window([10, 20, 31, 11], pad=1.5) == (25.0, 25.0, 46.5)
    g = torch.Generator().manual_seed(0)
    windows = np.array([crop.jitter_window([10, 20, 31, 11], 1.5, 0.25, 0.25, g) for _ in range(500)])
    assert np.abs(windows[:, 0] - 25).max() <= 0.25 * 31 and np.abs(windows[:, 1] - 25).max() <= 0.25 * 11
    assert windows[:, 2].min() >= 46.5 * 0.75 and windows[:, 2].max() <= 46.5 * 1.25
    assert windows[:, 0].std() > 2 and windows[:, 2].std() > 3  # it does move


def write(tmp_path, detections):
    path = tmp_path / "detections.json"
    path.write_text(json.dumps(detections))
    return path


GOOD = {"scene_id": 1, "image_id": 3, "category_id": 2, "bbox": [10, 20, 30, 40], "score": 0.9, "time": 0.1}


def test_detections_file_is_read_best_first_and_filtered_by_score(tmp_path):
    other = GOOD | {"bbox": [12, 22, 30, 40], "score": 0.95}
    weak = GOOD | {"score": 0.05}
    detections = crop.load_detections(write(tmp_path, [GOOD, weak, other]), min_score=0.1)
    assert list(detections) == [(1, 3, 2)]
    assert [score for _, score in detections[(1, 3, 2)]] == [0.95, 0.9]
    # the match is the detection overlapping the true box most, not the best-scoring one
    assert list(crop.match_detection(detections[(1, 3, 2)], [10, 20, 30, 40], 0.5)) == [10, 20, 30, 40]
    assert crop.match_detection(detections[(1, 3, 2)], [100, 100, 5, 5], 0.1) is None


@pytest.mark.parametrize(
    "content, message",
    [
        ({"a": 1}, r"expected a list of detections"),
        ([GOOD, "x"], r"detection 1 is not an object"),
        ([{k: v for k, v in GOOD.items() if k != "bbox"}], r"detection 0 has no 'bbox'"),
        ([GOOD | {"image_id": 1.5}], r"detection 0: image_id=1.5 is not an integer"),
        ([GOOD | {"bbox": [1, 2, 3]}], r"detection 0: bbox \[1, 2, 3\] is not 4 finite numbers"),
        ([GOOD | {"bbox": [1, 2, 0, 4]}], r"detection 0: bbox \[1, 2, 0, 4\] has a width or height <= 0"),
        ([GOOD | {"bbox": "box"}], r"detection 0: bbox must be 4 numbers"),
        ([GOOD | {"score": None}], r"detection 0: bbox must be 4 numbers and score a number"),
    ],
)
def test_bad_detections_name_the_file_the_entry_and_the_problem(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(BopFormatError, match=r"detections\.json: " + message):
        crop.load_detections(path)


def test_missing_or_malformed_detections_file(tmp_path):
    with pytest.raises(BopFormatError, match=r"nope\.json: detections file is missing"):
        crop.load_detections(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(BopFormatError, match=r"bad\.json: malformed JSON"):
        crop.load_detections(tmp_path / "bad.json")

"""The service's input checks and preprocessing (serve.py): decode the sent image, check the intrinsics and
the optional object box, bring the image to the model input (resize a whole image, or crop around the box
as training does), and the shifted copy the agreement score compares with. Bad input is `BadInput`
(an HTTP status and a message naming what is wrong).
"""

import io
import math

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# the crop training cuts (torchvision's roi_align), imported at startup rather than on the first box
from ..data import crop as crops

IMAGE_CONTENT_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/pjpeg", "application/octet-stream", ""}
IMAGE_FORMATS = {"PNG", "JPEG"}
# 8-bit colour or grey; 16-bit/float modes (e.g. a depth PNG sent by mistake) would be clipped into nonsense
IMAGE_MODES = {"RGB", "RGBA", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr"}
# focal lengths (pixels) outside [side / FOCAL_FACTOR, side * FOCAL_FACTOR] are rejected as implausible
FOCAL_FACTOR = 100


class BadInput(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


# --- input checks and preprocessing ---------------------------------------------------------------


def decode_image(data, content_type=None, max_pixels=4096 * 4096):
    """PNG/JPEG bytes -> RGB PIL image; BadInput for anything else, truncated or too many pixels."""
    content_type = (content_type or "").split(";")[0].strip().lower()
    if content_type not in IMAGE_CONTENT_TYPES:
        raise BadInput(415, f"image part has content type {content_type!r}; send image/png or image/jpeg")
    if not data:
        raise BadInput(400, "image is empty")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's own guard, for headers claiming billions of pixels
        raise BadInput(413, f"image is too large ({e})") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadInput(400, f"image is not a readable PNG or JPEG ({e})") from e
    if img.format not in IMAGE_FORMATS:
        raise BadInput(415, f"image format is {img.format}; send PNG or JPEG")
    if img.mode not in IMAGE_MODES:
        raise BadInput(415, f"image mode is {img.mode}; send an 8-bit RGB (or grey) image, not 16-bit/float")
    w, h = img.size
    if w < 1 or h < 1 or w * h > max_pixels:
        raise BadInput(413, f"image is {w}x{h} pixels; at most {max_pixels} pixels are accepted")
    try:
        img.load()  # a truncated file fails here (PIL's LOAD_TRUNCATED_IMAGES is off)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadInput(400, f"image could not be decoded, it may be truncated ({e})") from e
    try:
        return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise BadInput(415, f"image mode {img.mode} cannot be converted to RGB ({e})") from e


def check_intrinsics(fx, fy, cx, cy, width, height):
    for name, value in (("fx", fx), ("fy", fy), ("cx", cx), ("cy", cy)):
        if not math.isfinite(value):
            raise BadInput(422, f"{name}={value} is not a finite number")
    for name, value, side in (("fx", fx, width), ("fy", fy, height)):
        if value <= 0:
            raise BadInput(422, f"{name}={value}: focal lengths must be positive (pixels)")
        # a focal length of side / FOCAL_FACTOR is a ~179 degree field of view, side * FOCAL_FACTOR ~0.6 degrees
        low, high = side / FOCAL_FACTOR, side * FOCAL_FACTOR
        if not low <= value <= high:
            raise BadInput(
                422,
                f"{name}={value} is not a focal length a camera has for a {width}x{height} image "
                f"(expected {low:g}..{high:g} pixels of the sent image)",
            )
    # pixel centres at integer coordinates: the image spans [-0.5, width - 0.5]
    if not -0.5 <= cx <= width - 0.5:
        raise BadInput(422, f"cx={cx} is outside the image [-0.5, {width - 0.5}] (pixels of the sent image)")
    if not -0.5 <= cy <= height - 0.5:
        raise BadInput(422, f"cy={cy} is outside the image [-0.5, {height - 0.5}] (pixels of the sent image)")


def fit_to_input(img, K, width, height, aspect_tolerance):
    """Resize to the model input size and scale K with it; BadInput on an aspect-ratio mismatch."""
    w, h = img.size
    if (w, h) == (width, height):
        return img, K
    mismatch = abs((w / h) / (width / height) - 1)
    if mismatch > aspect_tolerance:
        raise BadInput(
            422,
            f"image is {w}x{h} (aspect {w / h:.4f}) but the model takes {width}x{height} "
            f"(aspect {width / height:.4f}); send the object's box (box_x, box_y, box_w, box_h) to have it "
            "cropped as in training, or crop the image to that aspect ratio and shift cx, cy by the crop offset",
        )
    sx, sy = width / w, height / h
    K = K.copy()
    # as BopDataset: pixel centres sit at integer coordinates, so the scaling pivots on -0.5
    K[0, 0], K[0, 2] = K[0, 0] * sx, (K[0, 2] + 0.5) * sx - 0.5
    K[1, 1], K[1, 2] = K[1, 1] * sy, (K[1, 2] + 0.5) * sy - 0.5
    return img.resize((width, height), Image.BILINEAR), K


BOX_FIELDS = ("box_x", "box_y", "box_w", "box_h")


def check_box(box, width, height):
    """The box [x, y, w, h] (pixels of the sent image) or None when no field is given; BadInput otherwise."""
    given = [name for name, value in zip(BOX_FIELDS, box, strict=True) if value is not None]
    if not given:
        return None
    if len(given) < len(BOX_FIELDS):
        missing = [name for name in BOX_FIELDS if name not in given]
        raise BadInput(422, f"the box needs all of {', '.join(BOX_FIELDS)}; missing {', '.join(missing)}")
    for name, value in zip(BOX_FIELDS, box, strict=True):
        if not math.isfinite(value):
            raise BadInput(422, f"{name}={value} is not a finite number")
    x, y, w, h = box
    if w <= 0 or h <= 0:
        raise BadInput(422, f"box_w={w}, box_h={h}: the box must have a positive width and height (pixels)")
    if x + w <= 0 or y + h <= 0 or x >= width or y >= height:
        raise BadInput(422, f"box [x={x}, y={y}, w={w}, h={h}] lies outside the {width}x{height} image")
    return [float(v) for v in box]


def crop_to_input(img, K, box, size, pad):
    """The square window of pad x the box around it, resized to size x size as training crops it
    (data/crop.py), and the crop's K: float32 [3,size,size] in [0,1], K float64 [3,3]."""
    window = crops.box_window(box, pad)
    frame = torch.from_numpy(np.asarray(img, np.uint8).copy()).permute(2, 0, 1)
    pixels = crops.crop_image(frame, window, size).div_(255.0).numpy()
    return pixels, crops.crop_intrinsics(K, window, size)


def shifted(image, K, px):
    """The image moved by px pixels right and down (edges replicated) with the principal point moved too."""
    moved = np.pad(image, ((0, 0), (px, 0), (px, 0)), mode="edge")[:, : image.shape[1], : image.shape[2]]
    K = K.copy()
    K[0, 2] += px
    K[1, 2] += px
    return moved, K


def rotation_difference_deg(R1, R2):
    cos = (np.trace(R1.T @ R2) - 1) / 2
    return math.degrees(math.acos(float(np.clip(cos, -1.0, 1.0))))

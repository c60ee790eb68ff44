"""A small client for the pose service: send one image with its intrinsics, print the pose.

    python -m <package>.deployment.client 2_data/dataset/test/000000/rgb/000000.png \\
        --fx 80 --fy 80 --cx 31.5 --cy 31.5 [--box X Y W H] [--url http://127.0.0.1:8000]

fx, fy, cx, cy are the OpenCV pinhole intrinsics of the image file as sent, in its pixels (the service
scales them when it resizes). With `--camera scene_camera.json` they are read from a BOP camera file
instead (`--im-id` picks the entry, default the image's file name). `--box X Y W H` (the object's box in
the image, pixels) sends a full frame to be cropped around it as training crops. Prints the JSON answer;
its `id` is what `python -m <package>.deployment.feedback flag <id>` takes.
"""

import argparse
import json
import sys
from pathlib import Path

import httpx

CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def predict(url, image_path, fx, fy, cx, cy, timeout=30.0, box=None):
    """POST one image (and the object's box [x, y, w, h], if given) to {url}/predict; the answer as a dict,
    RuntimeError with the service's message otherwise."""
    image_path = Path(image_path)
    content_type = CONTENT_TYPES.get(image_path.suffix.lower(), "application/octet-stream")
    files = {"image": (image_path.name, image_path.read_bytes(), content_type)}
    data = {"fx": repr(float(fx)), "fy": repr(float(fy)), "cx": repr(float(cx)), "cy": repr(float(cy))}
    if box is not None:
        data |= {
            name: repr(float(v)) for name, v in zip(("box_x", "box_y", "box_w", "box_h"), box, strict=True)
        }
    try:
        r = httpx.post(f"{url.rstrip('/')}/predict", files=files, data=data, timeout=timeout)
    except httpx.HTTPError as e:
        raise RuntimeError(f"cannot reach the service at {url} ({e}); start it with: make serve") from e
    if r.status_code != 200:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise RuntimeError(f"the service answered {r.status_code}: {detail}")
    return r.json()


def intrinsics_from_bop(camera_path, im_id):
    """fx, fy, cx, cy of one entry of a BOP scene_camera.json (cam_K, row-major)."""
    cameras = json.loads(Path(camera_path).read_text())
    if str(im_id) not in cameras:
        raise KeyError(f"{camera_path} has no entry for image {im_id}")
    K = cameras[str(im_id)]["cam_K"]
    return K[0], K[4], K[2], K[5]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="client", description="Send an image to the pose service.")
    parser.add_argument("image", type=Path, help="PNG or JPEG file")
    parser.add_argument("--fx", type=float)
    parser.add_argument("--fy", type=float)
    parser.add_argument("--cx", type=float)
    parser.add_argument("--cy", type=float)
    parser.add_argument("--camera", type=Path, help="a BOP scene_camera.json to read the intrinsics from")
    parser.add_argument("--im-id", type=int, help="entry of --camera (default: the image's file name)")
    parser.add_argument("--box", type=float, nargs=4, metavar=("X", "Y", "W", "H"), help="object box, pixels")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    args = parser.parse_args(argv)
    try:
        if not args.image.is_file():
            raise FileNotFoundError(f"image {args.image} does not exist")
        if args.camera:
            im_id = args.im_id if args.im_id is not None else int(args.image.stem)
            fx, fy, cx, cy = intrinsics_from_bop(args.camera, im_id)
        else:
            missing = [k for k in ("fx", "fy", "cx", "cy") if getattr(args, k) is None]
            if missing:
                raise ValueError(f"give the intrinsics of the image: --{' --'.join(missing)} (or --camera)")
            fx, fy, cx, cy = args.fx, args.fy, args.cx, args.cy
        answer = predict(args.url, args.image, fx, fy, cx, cy, box=args.box)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as e:
        print(f"client: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

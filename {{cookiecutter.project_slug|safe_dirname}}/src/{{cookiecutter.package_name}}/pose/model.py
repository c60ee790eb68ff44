"""The pose network: a torchvision backbone, a translation head and an orientation head.

`build_model(cfg)` reads `cfg.model` (backbone and head knobs) and, from the loss config, which rotation
representation the orientation head outputs (`losses.rotation_of(cfg.loss)`, its size from `geometry.rotation_dim`)
and how the translation head's output is encoded (`cfg.loss.translation`, see `geometry`).

    net = build_model(cfg)
    out = net(images)              # images [B,3,H,W] in [0,1] -> {"rot": raw, "trans": raw}
    R, t_mm = net.decode(out, K)   # [B,3,3] rotations (model -> camera), [B,3] translations in mm
    PoseEstimator(net, views)(images, K)  # the same as one module (with test-time views): what is exported

The network normalizes its input itself, so an exported model takes plain [0,1] images.
"""

import math
from pathlib import Path

import roma
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from . import geometry, losses

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INITS = ("default", "he_normal", "xavier_uniform", "small_normal", "zeros")


def small_resnet(width=16, depth=1, stages=4, stem_stride=1):
    """A narrow ResNet from torchvision's BasicBlock: `stages` stages of `depth` blocks, widths w, 2w, 4w, ...

    torchvision's ResNet class fixes its widths at 64..512 and its stem at stride 4 (7x7/2 conv + max pool),
    which is too wide and too coarse for 64-96 px images; this keeps its blocks and changes only those two.
    """
    if width < 1 or depth < 1 or stages < 1:
        raise ValueError(f"model: width, depth and stages must be >= 1 (got {width}, {depth}, {stages})")
    layers = [
        nn.Conv2d(3, width, 3, stride=stem_stride, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
    ]
    inplanes = width
    for stage in range(stages):
        planes = width * 2**stage
        for block in range(depth):
            stride = 2 if stage > 0 and block == 0 else 1
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
            layers.append(BasicBlock(inplanes, planes, stride, downsample))
            inplanes = planes
    return nn.Sequential(*layers), inplanes


def torchvision_trunk(arch, stem_stride=None, weights=None):
    """A torchvision classification model without its classifier: images -> feature map [B,C,h,w].

    `weights` may name a local state-dict file (e.g. torchvision's resnet18 .pth) to start from; nothing is
    ever downloaded. `stem_stride=1` or 2 drops the stem's max pool (and, for 1, its conv stride) so small
    images keep enough resolution.
    """
    try:
        net = torchvision.models.get_model(arch, weights=None)
    except ValueError as error:
        raise ValueError(f"model.arch: unknown torchvision model '{arch}' ({error})") from error
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"model.weights: no such file {path} (weights are never downloaded)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, _ = net.load_state_dict(state, strict=False)
        if any(not k.startswith(("fc.", "classifier.")) for k in missing):
            raise ValueError(
                f"model.weights: {path} does not match model.arch={arch} (missing {missing[:3]}...)"
            )
    if hasattr(net, "layer4"):  # the ResNet family
        if stem_stride is not None:
            if stem_stride not in (1, 2, 4):
                raise ValueError(f"model.stem_stride must be 1, 2 or 4 for {arch} (got {stem_stride})")
            if stem_stride < 4:
                net.maxpool = nn.Identity()
            if stem_stride == 1:
                net.conv1.stride = (1, 1)
        trunk = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
        return trunk, net.fc.in_features
    if hasattr(net, "features"):  # MobileNet, EfficientNet, ConvNeXt, ...
        if stem_stride is not None:
            raise ValueError(f"model.stem_stride is only supported for ResNets, not {arch}")
        with torch.no_grad():
            channels = net.features(torch.zeros(1, 3, 64, 64)).shape[1]
        return net.features, channels
    raise ValueError(f"model.arch: {arch} has neither ResNet layers nor a `features` trunk")


def initialize(module, init, std=0.01):
    """Re-initialize conv and linear weights. `default` keeps PyTorch's; the others exist for comparisons."""
    if init not in INITS:
        raise ValueError(f"model.init must be one of {INITS} (got '{init}')")
    if init == "default":
        return
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            if init == "he_normal":
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif init == "xavier_uniform":
                nn.init.xavier_uniform_(m.weight)
            elif init == "small_normal":
                nn.init.normal_(m.weight, std=std)
            else:
                nn.init.zeros_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class PoseNet(nn.Module):
    def __init__(
        self,
        trunk,
        channels,
        rotation,
        translation,
        image_size=None,
        pool=4,
        hidden=256,
        dropout=0.0,
        normalize_input=True,
    ):
        super().__init__()
        self.image_size = image_size
        self.rotation = rotation
        self.translation = translation
        self.normalize_input = normalize_input
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.trunk = trunk
        # Pooling to a small grid rather than to 1x1 keeps where the object is, which translation needs.
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.neck = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * pool * pool, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.rot_head = nn.Linear(hidden, geometry.rotation_dim(rotation))
        self.trans_head = nn.Linear(hidden, 3)

    def forward(self, images):
        x = (images - self.mean) / self.std if self.normalize_input else images
        features = self.neck(self.pool(self.trunk(x)))
        return {"rot": self.rot_head(features), "trans": self.trans_head(features)}

    def decode(self, out, K, image_size=None):
        """Raw outputs -> (R [B,3,3], t [B,3] mm), given the input images' intrinsics K [B,3,3].

        `image_size` (H, W) of the input images defaults to the size the network was trained at.
        """
        R = geometry.raw_to_rotmat(out["rot"], self.rotation)
        t = geometry.decode_translation(out["trans"], K, self.translation, image_size or self.image_size)
        return R, t


class PoseEstimator(nn.Module):
    """image [B,3,H,W] in [0,1], K [B,3,3] -> (R [B,3,3], t_mm [B,3]); the module that is exported.

    `views` > 1 (model.test_views) averages test-time views: the network also sees each image turned about
    the ray through its centre in steps of 360 / views degrees (the training augmentation's turn,
    geometry.turn_about_centre), each view's pose is turned back (R = Q^T R', t = Q^T t') and the views are
    averaged, t by its mean and R by Gram-Schmidt on the mean matrix (roma.special_procrustes' SVD gives
    the same errors to 0.03 deg here, but ONNX has no SVD). One forward pass over views x B images.
    """

    def __init__(self, net, views=1):
        super().__init__()
        if int(views) < 1:
            raise ValueError(f"model.test_views must be >= 1 (got {views})")
        self.net = net
        self.views = int(views)

    def forward(self, image, K):
        if self.views == 1:
            return self.net.decode(self.net(image), K, image.shape[-2:])
        V = self.views
        zero = torch.zeros_like(K[:, 0, 0])  # [B] (not len(K): the exported batch axis stays dynamic)
        angles = torch.cat([zero + view * (2 * math.pi / V) for view in range(V)])
        K_views = K.repeat(V, 1, 1)
        turned, Q = geometry.turn_about_centre(image.repeat(V, 1, 1, 1), K_views, angles)
        R, t = self.net.decode(self.net(turned), K_views, image.shape[-2:])
        back = Q.transpose(1, 2).to(R.dtype)
        R = (back @ R).reshape(V, -1, 3, 3).mean(0)
        t = (back @ t.unsqueeze(-1)).reshape(V, -1, 3).mean(0)
        return roma.special_gramschmidt(R[..., :2]), t


def build_model(cfg):
    """PoseNet from `cfg.model` with the orientation output that the loss needs (`losses.rotation_of`)."""
    m = cfg.model
    if m.arch == "small_resnet":
        trunk, channels = small_resnet(m.width, m.depth, m.get("stages", 4), m.get("stem_stride") or 1)
        if m.get("weights"):
            raise ValueError("model.weights: pretrained weights need a torchvision arch (e.g. resnet18)")
    else:
        for key in ("width", "depth"):
            if m.get(key) is not None:
                raise ValueError(f"model.{key} applies to model.arch=small_resnet only (arch is {m.arch})")
        trunk, channels = torchvision_trunk(m.arch, m.get("stem_stride"), m.get("weights"))
    net = PoseNet(
        trunk,
        channels,
        rotation=losses.rotation_of(cfg.loss),
        translation=cfg.loss.translation,
        image_size=cfg.data.get("image_size"),  # an int: square images
        pool=m.get("pool", 4),
        hidden=m.get("hidden", 256),
        dropout=m.get("dropout", 0.0),
        normalize_input=m.get("normalize_input", True),
    )
    initialize(net, m.get("init", "default"), m.get("init_std", 0.01))
    return net


def count_parameters(net):
    return sum(p.numel() for p in net.parameters())

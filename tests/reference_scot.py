"""An independent reference of SCOT's official pipeline, written from its rules (docs/fidelity.md).

It shares no code with ``scot_ot`` beyond torch and torchvision's ResNet modules: the
forward pass is unrolled block by block as SCOT's code does it, and every stage
(resize, hyperpixels, CAM, staircase, cost, one Sinkhorn iteration from ``u = 1/N``,
RHM, argmax, keypoint transfer) is computed here from the official rule. It is the
oracle of ``tests/test_fidelity_end_to_end.py`` and ``benchmarks/fidelity.py``.

Only ResNet backbones with SCOT's published layer ids; one image pair at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
#: receptive field and jump of the first hyperpixel layer, by id (SCOT's tables for ResNets)
RF_SIZE = [11, 19, 27, 35, 43, 59, 75, 91, 107, 139, 171, 203, 235, 267, 299, 363, 427]
JUMP = [4, 4, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32]


def load(path) -> torch.Tensor:
    """(1, 3, H, W) ImageNet-normalised float32 image."""
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def resize(img: torch.Tensor, side: int = 300) -> Tuple[torch.Tensor, torch.Tensor]:
    """Official resize: float32 ratio side / max(H, W), sizes truncated, bilinear (no corners)."""
    size = torch.tensor(img.shape, dtype=torch.float32)
    ratio = torch.tensor(float(side), dtype=torch.float32) / size.max()
    h, w = int(size[2] * ratio), int(size[3] * ratio)
    return F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False), ratio


def forward(net, img: torch.Tensor, ids: Sequence[int]):
    """Hyperpixel maps (pre-activation residual sums) and the final map + logits."""
    feats = []
    x = net.maxpool(net.relu(net.bn1(net.conv1(img))))
    if 0 in ids:
        feats.append(x.clone())
    k = 0
    for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in stage:
            k += 1
            y = block.relu(block.bn1(block.conv1(x)))
            y = block.relu(block.bn2(block.conv2(y)))
            y = block.bn3(block.conv3(y))
            y = y + (block.downsample(x) if block.downsample is not None else x)
            if k in ids:
                feats.append(y.clone())
            x = block.relu(y)
    logits = net.fc(torch.flatten(net.avgpool(x), 1))
    return feats, x, logits


def cam_one_scale(net, fmap, logits, size) -> torch.Tensor:
    classes = torch.topk(F.softmax(logits, dim=1), k=2, dim=1).indices[0]
    c, h, w = fmap.shape[1:]
    maps = []
    for label in classes:
        cam = (net.fc.weight[label][None] @ fmap.reshape(c, h * w)).view(1, 1, h, w)
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=True)[0, 0]
        maps.append((cam - cam.min()) / cam.max())
    return torch.stack(maps).max(dim=0).values


def cam_multi(net, img, fmap, logits, ids) -> torch.Tensor:
    """Scales 1, 1.5, 2, each image resized from the previous scale's; area limit 800 x 800."""
    H, W = img.shape[-2:]
    total = cam_one_scale(net, fmap, logits, (H, W))
    for s in (1.5, 2.0):
        assert s * s * H * W <= 800 * 800, "the reference covers 300-px images only"
        img = F.interpolate(img, size=(int(s * H), int(s * W)), mode="bilinear", align_corners=True)
        _, fmap, logits = forward(net, img, ())
        total = total + cam_one_scale(net, fmap, logits, (H, W))
    return total / (total.max() + 1e-5)


@dataclass
class Side:
    feats: torch.Tensor  # (N, D)
    boxes: torch.Tensor  # (N, 4)
    weights: torch.Tensor  # (N, 1)
    size: Tuple[int, int]  # (W, H)
    ratio: torch.Tensor


def hyperpixels(net, path, ids: Sequence[int], side: int = 300) -> Side:
    img, ratio = resize(load(path), side)
    maps, fmap, logits = forward(net, img, ids)
    h, w = maps[0].shape[-2:]
    maps = [maps[0]] + [F.interpolate(m, size=(h, w), mode="bilinear", align_corners=True) for m in maps[1:]]
    feats = torch.cat(maps, dim=1)[0].reshape(-1, h * w).t()
    rf, jump = RF_SIZE[ids[0]], JUMP[ids[0]]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    x, y = xs.reshape(-1).float() * jump, ys.reshape(-1).float() * jump
    boxes = torch.stack([x - rf // 2, y - rf // 2, x + rf // 2, y + rf // 2], dim=1)
    centre = boxes[:, :2] + torch.div(boxes[:, 2:] - boxes[:, :2], 2, rounding_mode="floor")
    cam = cam_multi(net, img, fmap, logits, ids)
    sel = cam[centre[:, 1].long(), centre[:, 0].long()]
    weights = torch.full((h * w, 1), 0.5)
    weights[sel > 0.4] = 0.8
    weights[sel > 0.5] = 0.9
    weights[sel > 0.6] = 1.0
    return Side(feats, boxes, weights, (img.shape[-1], img.shape[-2]), ratio)


def ot_votes(src: Side, trg: Side, eps: float = 0.05, exponent: float = 0.5) -> torch.Tensor:
    """One Sinkhorn iteration from u = 1/N on the cosine cost, rescaled by N and powered."""
    sim = (src.feats @ trg.feats.t()) / (src.feats.norm(dim=1)[:, None] @ trg.feats.norm(dim=1)[None])
    cost = 1 - sim.clamp(min=0)
    mu, nu = src.weights / src.weights.sum(), trg.weights / trg.weights.sum()
    K = torch.exp(-cost / eps)
    u = torch.ones(len(mu), 1) / len(mu)
    v = nu / (K.t() @ u)
    u = mu / (K @ v)
    plan = u * K * v.t()
    return (len(mu) * plan).clamp(min=0).pow(exponent)


def rhm(src: Side, trg: Side, votes: torch.Tensor, ncells: int = 8192) -> torch.Tensor:
    hs_w, hs_h = src.size[0] + trg.size[0], src.size[1] + trg.size[1]
    cell = math.sqrt(hs_w * hs_h / ncells)
    nx, ny = int(hs_w / cell) + 1, int(hs_h / cell) + 1

    def centres(boxes):
        return boxes[:, :2] + torch.div(boxes[:, 2:] - boxes[:, :2], 2, rounding_mode="floor")

    s, t = centres(src.boxes), centres(trg.boxes)
    ref = torch.tensor(src.size, dtype=torch.float32)
    vote_xy = (ref - s)[:, :, None] + t.t()[None]  # (N, 2, M)
    bins = (vote_xy / cell).long()
    bins = bins[:, 0] + bins[:, 1] * nx  # (N, M)
    space = torch.zeros(ny * nx).index_add_(0, bins.reshape(-1), votes.reshape(-1))
    side = 7
    sig_sq = (side / 2 / 2.354) ** 2
    r = torch.arange(side, dtype=torch.float32) - (side - 1) / 2
    g = torch.exp(-(r[None] ** 2 / 2 / sig_sq + r[:, None] ** 2 / 2 / sig_sq))
    g = g / g.sum()
    space = F.conv2d(space.view(1, 1, ny, nx), g[None, None], padding=3).view(-1)
    return votes * space[bins]


def transfer(src: Side, trg: Side, matches: torch.Tensor, kps: torch.Tensor) -> torch.Tensor:
    """(K, 2) keypoints in resized source pixels -> resized target pixels (mean over covering boxes)."""
    b = src.boxes
    inside = ((kps[:, None, 0] >= b[None, :, 0]) & (kps[:, None, 1] >= b[None, :, 1])
              & (kps[:, None, 0] <= b[None, :, 2]) & (kps[:, None, 1] <= b[None, :, 3])).float()
    moved = trg.boxes[matches, :2][None] + (kps[:, None, :] - b[None, :, :2])  # (K, N, 2)
    return (moved * inside[..., None]).sum(1) / inside.sum(1, keepdim=True)


@torch.no_grad()
def match(net, src_path, trg_path, ids: Sequence[int], src_kps: torch.Tensor):
    """Official SCOT on one pair: (matches (N,), keypoints in original target pixels (K, 2))."""
    src = hyperpixels(net, src_path, ids)
    trg = hyperpixels(net, trg_path, ids)
    scores = rhm(src, trg, ot_votes(src, trg))
    matches = scores.max(dim=1).indices
    pred = transfer(src, trg, matches, src_kps.float() * src.ratio)
    return matches, pred / trg.ratio


def random_resnet(name: str = "resnet101", seed: int = 0, fc_scale: float = 0.01):
    """A randomly initialised torchvision ResNet in eval mode, classifier scaled small."""
    import torchvision

    torch.manual_seed(seed)
    net = getattr(torchvision.models, name)(weights=None).eval()
    with torch.no_grad():
        net.fc.weight.mul_(fc_scale)
        net.fc.bias.mul_(fc_scale)
    return net


__all__: List[str] = ["match", "random_resnet", "hyperpixels", "resize"]

"""MedFL's Med3D with GroupNorm and the U-Net head (shared/model/med3d.ts: "head.dec.*") in PyTorch, for
bench/py/med3d_train_step.py and the parity check of bench/py/med3d_unet_grads.py. Module names follow MedFL's
parameter names: "enc." + the encoder's MedicalNet names (MedFL "encoder."), "dec." + the head's (MedFL "head.dec.")."""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', 'scripts'))
from make_med3d_fixtures import Med3d  # noqa: E402


def group_norm_everywhere(module, groups):
    """Replaces every BatchNorm3d below `module` by GroupNorm(groups) with the same channels (MedFL's norm: group)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm3d):
            setattr(module, name, nn.GroupNorm(groups, child.num_features, eps=1e-5))
        else:
            group_norm_everywhere(child, groups)


class UnetHead(nn.Module):
    """MedFL's U-Net head (head.dec.*): up3 on layer4 + layer1 skip, up2 + stem skip, up1 + a full-resolution
    3^3 conv of the input, a 1^3 fusion and a 1^3 classifier; norm + ReLU after every conv but the classifier."""

    def __init__(self, feat, base, ch, classes, groups):
        super().__init__()

        def gn():
            return nn.GroupNorm(groups, ch, eps=1e-5)

        self.up3 = nn.ConvTranspose3d(feat, ch, 2, stride=2)
        self.conv3 = nn.Conv3d(ch + base, ch, 3, padding=1, bias=False)
        self.norm3 = gn()
        self.up2 = nn.ConvTranspose3d(ch, ch, 2, stride=2)
        self.conv2 = nn.Conv3d(ch + base, ch, 3, padding=1, bias=False)
        self.norm2 = gn()
        self.up1 = nn.ConvTranspose3d(ch, ch, 2, stride=2)
        self.in_conv = nn.Conv3d(1, ch, 3, padding=1, bias=False)
        self.in_norm = gn()
        self.conv1 = nn.Conv3d(2 * ch, ch, 1, bias=False)
        self.norm1 = gn()
        self.cls = nn.Conv3d(ch, classes, 1, bias=False)

    def forward(self, x, stem, layer1, feats):
        y = F.relu(self.norm3(self.conv3(torch.cat([self.up3(feats), layer1], 1))))
        y = F.relu(self.norm2(self.conv2(torch.cat([self.up2(y), stem], 1))))
        full = F.relu(self.in_norm(self.in_conv(x)))
        y = F.relu(self.norm1(self.conv1(torch.cat([self.up1(y), full], 1))))
        return self.cls(y)


class Med3dUnet(nn.Module):
    def __init__(self, depth, shortcut, base, ch, classes, groups):
        super().__init__()
        self.enc = Med3d(depth, shortcut, base=base)
        group_norm_everywhere(self.enc, groups)
        self.dec = UnetHead(base * 8, base, ch, classes, groups)

    def forward(self, x):
        e = self.enc
        stem = F.relu(e.bn1(e.conv1(x)))
        layer1 = e.layer1(e.maxpool(stem))
        feats = e.layer4(e.layer3(e.layer2(layer1)))
        return self.dec(x, stem, layer1, feats)

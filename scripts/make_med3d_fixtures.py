#!/usr/bin/python3
"""Reference fixtures for MedFL's Med3D (MedicalNet) port: PyTorch outputs that the tfjs forward must match.

Run from the repository root with Debian's PyTorch (no other packages than torch and numpy):

    /usr/bin/python3 scripts/make_med3d_fixtures.py [--out test/fixtures/med3d]

The network below is written from MedicalNet's published layout (the module structure of its
models/resnet.py as described there), not copied from any repository. It reproduces MedicalNet's
module names, so state_dict keys are exactly those of the published checkpoints (minus the
DataParallel "module." prefix).

Written files (see test/fixtures/med3d/README.md):
  input.npy                 float32 [1, 1, D, H, W] (NCDHW, PyTorch layout), D,H,W = 34, 40, 44
  <name>.safetensors        state_dict in PYTORCH names and layouts, float32 only (num_batches_tracked
                            dropped: int64 and meaningless in eval); __metadata__ names the architecture
  <name>.layer4.npy         float32 [1, C, D', H', W'] encoder output (NCDHW)
  <name>.seg.npy            float32 [1, classes, D'', H'', W''] conv_seg output (NCDHW), models with a head
  r10-A.pth                 torch.save({'state_dict': {'module.' + k: v}}) with num_batches_tracked,
                            as MedicalNet publishes its checkpoints (for checkpoint-reader tests)
"""
import argparse
import json
import os
import struct
import sys

import numpy as np
import torch

from fixture_io import nontrivial_bn, write_npy, write_safetensors
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------
# MedicalNet layout


def conv3x3x3(cin, cout, stride=1, dilation=1):
    return nn.Conv3d(cin, cout, kernel_size=3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def shortcut_a(x, planes, stride):
    """Type A: 1x1x1 average pool with the stride, then zero channels appended after the existing ones.
    (MedicalNet builds the zeros from out.data, which also cuts the gradient through the shortcut; the
    forward values are the same as here.)"""
    out = F.avg_pool3d(x, kernel_size=1, stride=stride)
    pad = torch.zeros(out.size(0), planes - out.size(1), out.size(2), out.size(3), out.size(4), dtype=out.dtype)
    return torch.cat([out, pad], dim=1)


class ShortcutA(nn.Module):
    def __init__(self, planes, stride):
        super().__init__()
        self.planes = planes
        self.stride = stride

    def forward(self, x):
        return shortcut_a(x, self.planes, self.stride)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3x3(inplanes, planes, stride=stride, dilation=dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, kernel_size=3, stride=stride, dilation=dilation, padding=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.relu(out + residual)


LAYERS = {10: (BasicBlock, [1, 1, 1, 1]), 18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
          50: (Bottleneck, [3, 4, 6, 3]), 101: (Bottleneck, [3, 4, 23, 3])}


class Med3d(nn.Module):
    def __init__(self, depth, shortcut, base=64, head_channels=32, num_seg_classes=None):
        super().__init__()
        block, counts = LAYERS[depth]
        self.inplanes = base
        self.conv1 = nn.Conv3d(1, base, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, base, counts[0], shortcut)
        self.layer2 = self._make_layer(block, base * 2, counts[1], shortcut, stride=2)
        self.layer3 = self._make_layer(block, base * 4, counts[2], shortcut, stride=1, dilation=2)
        self.layer4 = self._make_layer(block, base * 8, counts[3], shortcut, stride=1, dilation=4)
        self.conv_seg = None
        if num_seg_classes is not None:
            self.conv_seg = nn.Sequential(
                nn.ConvTranspose3d(base * 8 * block.expansion, head_channels, 2, stride=2),
                nn.BatchNorm3d(head_channels),
                nn.ReLU(inplace=True),
                nn.Conv3d(head_channels, head_channels, kernel_size=3, stride=1, padding=1, bias=False),
                nn.BatchNorm3d(head_channels),
                nn.ReLU(inplace=True),
                nn.Conv3d(head_channels, num_seg_classes, kernel_size=1, stride=1, bias=False),
            )
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out')
            elif isinstance(m, nn.BatchNorm3d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def _make_layer(self, block, planes, blocks, shortcut, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            if shortcut == 'A':
                downsample = ShortcutA(planes * block.expansion, stride)
            else:
                downsample = nn.Sequential(
                    nn.Conv3d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm3d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride=stride, dilation=dilation, downsample=downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, dilation=dilation))
        return nn.Sequential(*layers)

    def embed(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.conv_seg(self.embed(x))


# ---------------------------------------------------------------------------------------------------
# Files


def make_stats_nontrivial(model, gen, shape):
    def batch():
        x = torch.randn(2, *shape[1:], generator=gen)
        return model(x) if model.conv_seg is not None else model.embed(x)

    nontrivial_bn(model, gen, nn.BatchNorm3d, batch)



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default='test/fixtures/med3d')
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(20240611)
    gen = torch.Generator().manual_seed(7)
    # Odd intermediate sizes (34→17→9→5, 44→22→11→6) exercise the padding of strided convs and pools;
    # layer4 of 5×5×6 lets the dilation-4 taps reach real voxels; D≠H≠W catches axis mix-ups.
    shape = (1, 1, 34, 40, 44)
    x = torch.randn(*shape, generator=gen)
    write_npy(os.path.join(args.out, 'input.npy'), x.numpy())

    models = [
        # name, depth, shortcut, widthMultiplier, head channels, seg classes
        ('r10-A', 10, 'A', 0.0625, 2, 2),
        ('r10-B', 10, 'B', 0.0625, 2, 2),
        ('r50-B', 50, 'B', 0.015625, None, None),
    ]
    for name, depth, shortcut, wm, hc, ncls in models:
        base = max(1, round(64 * wm))
        model = Med3d(depth, shortcut, base=base, head_channels=hc or 1, num_seg_classes=ncls)
        make_stats_nontrivial(model, gen, shape)
        with torch.no_grad():
            feats = model.embed(x)
            write_npy(os.path.join(args.out, f'{name}.layer4.npy'), feats.numpy())
            if ncls is not None:
                seg = model(x)
                write_npy(os.path.join(args.out, f'{name}.seg.npy'), seg.numpy())
        sd = model.state_dict()
        tensors = {k: v.numpy() for k, v in sd.items() if not k.endswith('num_batches_tracked')}
        head = {'kind': 'segmentation', 'numClasses': ncls, 'channels': hc} if ncls is not None else None
        meta = {
            'format': 'pytorch-state-dict',
            'architecture': 'med3d',
            'med3d': json.dumps({'depth': depth, 'shortcut': shortcut, 'widthMultiplier': wm, 'head': head}),
            'torch': torch.__version__,
        }
        write_safetensors(os.path.join(args.out, f'{name}.safetensors'), tensors, meta)
        if name == 'r10-A':
            torch.save({'state_dict': {'module.' + k: v for k, v in sd.items()}}, os.path.join(args.out, 'r10-A.pth'))
        n_params = sum(v.numel() for k, v in sd.items() if not k.endswith('num_batches_tracked'))
        print(f'{name}: {len(sd)} entries, {n_params} float params, layer4 {tuple(feats.shape)}'
              + (f', seg {tuple(seg.shape)}' if ncls is not None else ''), file=sys.stderr)

    # Full-width encoder sizes, to check MedicalNet's published sizes: their "params" are model.parameters() (conv weights,
    # BN gamma/beta; no running statistics), its "entries" are state_dict keys (num_batches_tracked included).
    sizes = {}
    for depth, sc in [(10, 'B'), (18, 'A'), (34, 'A'), (50, 'B'), (101, 'B')]:
        m = Med3d(depth, sc)
        sd = m.state_dict()
        sizes[f'R{depth}-{sc}'] = {'entries': len(sd), 'parameters': int(sum(p.numel() for p in m.parameters())),
                                   'state_dict_elements': int(sum(v.numel() for v in sd.values()))}
    print(json.dumps(sizes), file=sys.stderr)


if __name__ == '__main__':
    main()

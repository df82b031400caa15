#!/usr/bin/python3
"""Reference fixtures for MedFL's 2D -> 3D weight inflation (shared/model/transfer-init.ts, strategies
"inflate-2d:i3d" and "inflate-2d:1xk"): a tiny 2D ResNet in torchvision's layout and key names, an image,
and the 2D network's responses computed by PyTorch, which test/model/transfer-init.test.ts compares with
the inflated 3D Med3D encoder run in tfjs on volumes of identical slices.

Run from the repository root with Debian's PyTorch (torch and numpy only; torchvision is NOT needed
and not used):

    /usr/bin/python3 scripts/make_inflation_fixtures.py [--out test/fixtures/inflate]

The 2D network is written here from torchvision's well-known ResNet layout (conv1 7x7/2 pad 3, bn1, relu,
maxpool 3x3/2 pad 1, layer1..layer4 of BasicBlocks with strides 1,2,2,2, a 1x1 conv + BN "downsample"
projection when the stride or width changes, global average pool, fc), so its state_dict keys are exactly
torchvision's (conv1.weight [P,3,7,7], bn1.*, layer1.0.conv1.weight [P,P,3,3], layer2.0.downsample.0.weight,
layer2.0.downsample.1.running_var, fc.weight, ...). No code was copied from torchvision. BasicBlock counts
[1,1,1,1] ("ResNet-10", which torchvision does not ship but which has the same key pattern as ResNet-18)
and 4 base planes: the widths of Med3D with widthMultiplier 0.0625.

Written files (see test/fixtures/inflate/README.md):
  resnet10_2d.safetensors  state_dict in PyTorch names and layouts, float32, without num_batches_tracked
  image.npy                float32 [1, 1, H, W] grey image (NCHW), H, W = 22, 30
  conv1.npy                float32 [1, P, 11, 15]  conv1(x3)                      with x3 = image as R=G=B
  stem.npy                 float32 [1, P, 11, 15]  relu(bn1(conv1(x3)))
  layer1.npy               float32 [1, P, 6, 8]    layer1(maxpool(stem))
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


class BasicBlock2d(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet2d(nn.Module):
    """torchvision-layout ResNet with BasicBlocks (module names as torchvision's, so the keys are too)."""

    def __init__(self, counts, base=64, num_classes=1000):
        super().__init__()
        self.inplanes = base
        self.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(base, counts[0], 1)
        self.layer2 = self._make_layer(base * 2, counts[1], 2)
        self.layer3 = self._make_layer(base * 4, counts[2], 2)
        self.layer4 = self._make_layer(base * 8, counts[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(base * 8, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock2d(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        for _ in range(1, blocks):
            layers.append(BasicBlock2d(planes, planes))
        return nn.Sequential(*layers)

    def stem(self, x):
        return self.relu(self.bn1(self.conv1(x)))

    def forward(self, x):
        x = self.maxpool(self.stem(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def make_bn_nontrivial(model, gen, shape):
    nontrivial_bn(model, gen, nn.BatchNorm2d, lambda: model(torch.randn(4, 3, *shape, generator=gen)))



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default='test/fixtures/inflate')
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(20240612)
    gen = torch.Generator().manual_seed(11)

    base = 4  # Med3D widthMultiplier 0.0625
    model = ResNet2d([1, 1, 1, 1], base=base, num_classes=5)
    # H != W (a swapped kernel axis shows) and odd intermediate sizes (22 -> 11 -> 6, 30 -> 15 -> 8).
    h, w = 22, 30
    make_bn_nontrivial(model, gen, (h, w))

    # A smooth image with detail (so the 7x7 kernels see structure), plus noise.
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing='ij')
    img = torch.sin(3 * xx + 1.3 * yy) + 0.5 * torch.cos(5 * yy * xx) + 0.3 * torch.randn(h, w, generator=gen)
    img = img.reshape(1, 1, h, w).float()
    x3 = img.expand(1, 3, h, w).contiguous()  # a grey image fed to an RGB network: R = G = B

    with torch.no_grad():
        conv1 = model.conv1(x3)
        stem = model.stem(x3)
        layer1 = model.layer1(model.maxpool(stem))

    write_npy(os.path.join(args.out, 'image.npy'), img.numpy())
    write_npy(os.path.join(args.out, 'conv1.npy'), conv1.numpy())
    write_npy(os.path.join(args.out, 'stem.npy'), stem.numpy())
    write_npy(os.path.join(args.out, 'layer1.npy'), layer1.numpy())

    sd = model.state_dict()
    tensors = {k: v.numpy() for k, v in sd.items() if not k.endswith('num_batches_tracked')}
    meta = {
        'format': 'pytorch-state-dict',
        'architecture': 'torchvision-resnet-2d',
        'resnet2d': json.dumps({'blocks': [1, 1, 1, 1], 'block': 'basic', 'basePlanes': base, 'inChannels': 3, 'numClasses': 5}),
        'torch': torch.__version__,
    }
    write_safetensors(os.path.join(args.out, 'resnet10_2d.safetensors'), tensors, meta)
    n = sum(v.size for v in tensors.values())
    print(f'resnet10_2d: {len(tensors)} tensors, {n} floats; conv1 {tuple(conv1.shape)}, layer1 {tuple(layer1.shape)}', file=sys.stderr)


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""Times one Med3D training step in PyTorch on the GPU, for bench/gpu-check.ts: the same network (MedicalNet's
layout, scripts/make_med3d_fixtures.py; full width, segmentation head, BatchNorm), batch, loss (MedFL's
0.5·(cross-entropy + 1 − foreground soft Dice) on the head's ¼ grid) and optimiser (Adam, lr 1e-3) as the
MedFL CUDA device step, and the same work per step: the batch copied from host memory, forward, loss, backward,
optimiser step, the loss read back. cudnn.benchmark on (MedFL measures its cuDNN algorithms too); TF32 convolutions
as PyTorch's default. Also with bf16 autocast (mixed precision, fp32 master weights).
Reads a JSON list of configs on stdin ({name, depth, shortcut, size, batch, steps, warmup}); prints one JSON line per
config: {"name", "fp32_ms", "bf16_ms"} (medians)."""
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', 'scripts'))
from make_med3d_fixtures import Med3d  # noqa: E402


def dice_ce(out, target, classes):
    ce = F.cross_entropy(out, target)
    p = out.softmax(1)
    onehot = F.one_hot(target, classes).permute(0, 4, 1, 2, 3).to(p.dtype)
    dims = (0, 2, 3, 4)
    dice = ((2 * (p * onehot).sum(dims) + 1) / (p.sum(dims) + onehot.sum(dims) + 1))[1:].mean()
    return 0.5 * (ce + 1 - dice)


def time_steps(c, amp):
    torch.manual_seed(0)
    dev = torch.device('cuda')
    s = c['size']
    model = Med3d(c['depth'], c['shortcut'], base=64, head_channels=32, num_seg_classes=2).to(dev)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_host = torch.randn(c['batch'], 1, s, s, s)
    target = (torch.rand(c['batch'], s // 4, s // 4, s // 4) > 0.8).long().to(dev)
    times = []
    for i in range(c['warmup'] + c['steps']):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        x = x_host.to(dev)
        opt.zero_grad()
        if amp:
            with torch.autocast('cuda', dtype=torch.bfloat16):
                out = model(x)
            loss = dice_ce(out.float(), target, 2)
        else:
            out = model(x)
            loss = dice_ce(out, target, 2)
        loss.backward()
        opt.step()
        loss.item()
        torch.cuda.synchronize()
        if i >= c['warmup']:
            times.append((time.perf_counter() - t0) * 1000)
    del model, opt
    torch.cuda.empty_cache()
    return statistics.median(times)


def main():
    torch.backends.cudnn.benchmark = True
    for c in json.load(sys.stdin):
        fp32 = time_steps(c, False)
        bf16 = time_steps(c, True)
        print(json.dumps({'name': c['name'], 'fp32_ms': fp32, 'bf16_ms': bf16}), flush=True)


if __name__ == '__main__':
    main()

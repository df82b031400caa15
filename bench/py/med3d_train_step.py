#!/usr/bin/python3
"""Times one Med3D training step in PyTorch, for bench/train.ts: the same network (scripts/make_med3d_fixtures.py
layout; for "unet" configs MedFL's GroupNorm and U-Net head after shared/model/med3d.ts), batch, loss
family and optimiser as MedFL's Med3D trainer (the U-Net model: med3d_unet.py). Reads a JSON list of configs on stdin, prints one JSON line per
config: {"name", "median_ms", "min_ms", "cpu_ms" (median process CPU time per step, all threads), "threads"}."""
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', 'scripts'))
sys.path.insert(0, os.path.dirname(__file__))
from make_med3d_fixtures import Med3d  # noqa: E402
from med3d_unet import Med3dUnet  # noqa: E402


def dice_ce(out, target, classes):
    """MedFL's segmentation loss: 0.5 (cross-entropy + 1 - mean soft Dice of the foreground classes), smoothing 1."""
    ce = F.cross_entropy(out, target)
    p = out.softmax(1)
    onehot = F.one_hot(target, classes).permute(0, 4, 1, 2, 3).to(p.dtype)
    dims = (0, 2, 3, 4)
    dice = ((2 * (p * onehot).sum(dims) + 1) / (p.sum(dims) + onehot.sum(dims) + 1))[1:].mean()
    return 0.5 * (ce + 1 - dice)


def main():
    configs = json.load(sys.stdin)
    threads = int(os.environ.get('BENCH_THREADS', '2'))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    for c in configs:
        base = max(1, round(64 * c['width']))
        unet = c.get('head') == 'unet'
        s = c['size']
        if unet:
            model = Med3dUnet(c['depth'], c['shortcut'], base, max(8, round(32 * c['width'])), 2, 8)
            target = (torch.rand(c['batch'], s, s, s) > 0.8).long()
        else:
            model = Med3d(c['depth'], c['shortcut'], base=base, head_channels=max(1, round(32 * c['width'])), num_seg_classes=2)
            target = (torch.rand(c['batch'], s // 4, s // 4, s // 4) > 0.8).long()
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.randn(c['batch'], 1, s, s, s)
        times = []
        cpus = []
        for i in range(c['warmup'] + c['steps']):
            t0 = time.perf_counter()
            c0 = time.process_time()
            opt.zero_grad()
            out = model(x)
            loss = dice_ce(out, target, 2) if unet else F.cross_entropy(out, target)
            loss.backward()
            opt.step()
            dt = (time.perf_counter() - t0) * 1000
            dc = (time.process_time() - c0) * 1000
            if i >= c['warmup']:
                times.append(dt)
                cpus.append(dc)
        print(json.dumps({'name': c['name'], 'median_ms': statistics.median(times), 'min_ms': min(times), 'cpu_ms': statistics.median(cpus),
                          'threads': threads}), flush=True)


if __name__ == '__main__':
    main()

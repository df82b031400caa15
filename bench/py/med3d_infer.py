#!/usr/bin/python3
"""Times sliding-window inference of MedicalNet in PyTorch, for bench/infer.ts: the same network
(scripts/make_med3d_fixtures.py layout) with the same weights (MedFL's torch export), the same windows (their
starts come from MedFL) and the same blending (Gaussian, sigma = window/8 per axis, centre (n-1)/2, peak 1;
softmax of the logits upsampled x4 trilinearly, align_corners=False). Reads one JSON config on stdin:
{name, depth, shortcut, base, head_channels, classes, weights (.pth), image (raw float32 D*H*W), shape, window,
starts [[z, y, x], ...], batch, warmup, reps, out (raw float32 [D*H*W, classes], the last run's probabilities)};
prints one JSON line {"name", "median_ms", "min_ms", "threads"}."""
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', 'scripts'))
from make_med3d_fixtures import Med3d  # noqa: E402


def gaussian_weights(window):
    axes = []
    for n in window:
        sigma = n / 8
        c = (n - 1) / 2
        i = torch.arange(n, dtype=torch.float64)
        axes.append(torch.exp(-((i - c) ** 2) / (2 * sigma * sigma)))
    g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return (g / g.max()).float()


def infer(model, image, c, weight):
    D, H, W = c['shape']
    wd, wh, ww = c['window']
    k = c['classes']
    acc = torch.zeros(k, D, H, W)
    wsum = torch.zeros(D, H, W)
    starts = c['starts']
    for first in range(0, len(starts), c['batch']):
        group = starts[first:first + c['batch']]
        x = torch.stack([image[z:z + wd, y:y + wh, x0:x0 + ww] for z, y, x0 in group])[:, None]
        logits = model(x)
        probs = torch.softmax(F.interpolate(logits, scale_factor=4, mode='trilinear', align_corners=False), dim=1)
        for b, (z, y, x0) in enumerate(group):
            acc[:, z:z + wd, y:y + wh, x0:x0 + ww] += probs[b] * weight
            wsum[z:z + wd, y:y + wh, x0:x0 + ww] += weight
    return acc / wsum


def main():
    c = json.load(sys.stdin)
    threads = int(os.environ.get('BENCH_THREADS', '2'))
    torch.set_num_threads(threads)
    model = Med3d(c['depth'], c['shortcut'], base=c['base'], head_channels=c['head_channels'], num_seg_classes=c['classes'])
    model.load_state_dict(torch.load(c['weights']), strict=True)
    model.eval()
    D, H, W = c['shape']
    image = torch.from_numpy(np.fromfile(c['image'], dtype=np.float32).reshape(D, H, W))
    for z, y, x in c['starts']:
        assert z + c['window'][0] <= D and y + c['window'][1] <= H and x + c['window'][2] <= W, 'windows must lie inside the volume'
    weight = gaussian_weights(c['window'])
    times = []
    with torch.no_grad():
        for i in range(c['warmup'] + c['reps']):
            t0 = time.perf_counter()
            probs = infer(model, image, c, weight)
            dt = (time.perf_counter() - t0) * 1000
            if i >= c['warmup']:
                times.append(dt)
    probs.permute(1, 2, 3, 0).contiguous().numpy().astype(np.float32).tofile(c['out'])
    print(json.dumps({'name': c['name'], 'median_ms': statistics.median(times), 'min_ms': min(times), 'threads': threads}), flush=True)


if __name__ == '__main__':
    main()

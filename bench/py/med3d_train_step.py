#!/usr/bin/python3
"""Times one MedicalNet training step in PyTorch, for bench/train.ts: the same network (scripts/make_med3d_fixtures.py
layout), batch, loss family and optimiser as MedFL's Med3D trainer. Reads a JSON list of configs on stdin,
prints one JSON line per config: {"name", "median_ms", "min_ms", "threads"}."""
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', 'scripts'))
from make_med3d_fixtures import Med3d  # noqa: E402


def main():
    configs = json.load(sys.stdin)
    threads = int(os.environ.get('BENCH_THREADS', '2'))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    for c in configs:
        base = max(1, round(64 * c['width']))
        model = Med3d(c['depth'], c['shortcut'], base=base, head_channels=max(1, round(32 * c['width'])), num_seg_classes=2)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        s = c['size']
        x = torch.randn(c['batch'], 1, s, s, s)
        target = (torch.rand(c['batch'], s // 4, s // 4, s // 4) > 0.8).long()
        times = []
        for i in range(c['warmup'] + c['steps']):
            t0 = time.perf_counter()
            opt.zero_grad()
            out = model(x)
            loss = F.cross_entropy(out, target)
            loss.backward()
            opt.step()
            dt = (time.perf_counter() - t0) * 1000
            if i >= c['warmup']:
                times.append(dt)
        print(json.dumps({'name': c['name'], 'median_ms': statistics.median(times), 'min_ms': min(times), 'threads': threads}), flush=True)


if __name__ == '__main__':
    main()

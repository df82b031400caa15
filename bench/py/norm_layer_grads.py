#!/usr/bin/python3
"""PyTorch reference of MedFL's norm layers (test/model/norm-layers-torch.test.ts), in float64: nn.BatchNorm3d,
nn.GroupNorm and nn.InstanceNorm3d(affine=True) on the same inputs, optionally followed by a ReLU, forward and the
backward of loss = sum(out * probe). Reads JSON from stdin: {"cases": [{"name", "module": "batch_norm" | "group_norm" |
"instance_norm", "groups", "training", "relu", "shape": [N, D, H, W, C], "x", "probe", "weight", "bias"[,
"running_mean", "running_var"]}]} with tensors flat in NDHWC; writes JSON {name: {"y", "dx", "dweight", "dbias"[,
"running_mean", "running_var"]}} to stdout, NDHWC, the running statistics as they are after the forward."""
import json
import sys

import torch
import torch.nn as nn


def module_for(case, channels):
    kind = case['module']
    if kind == 'batch_norm':
        m = nn.BatchNorm3d(channels, eps=1e-5, momentum=0.1)
        with torch.no_grad():
            m.running_mean.copy_(torch.tensor(case['running_mean'], dtype=torch.float64))
            m.running_var.copy_(torch.tensor(case['running_var'], dtype=torch.float64))
    elif kind == 'group_norm':
        m = nn.GroupNorm(case['groups'], channels, eps=1e-5, affine=True)
    elif kind == 'instance_norm':
        m = nn.InstanceNorm3d(channels, eps=1e-5, affine=True, track_running_stats=False)
    else:
        raise SystemExit(f'unknown module {kind}')
    m = m.double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor(case['weight'], dtype=torch.float64))
        m.bias.copy_(torch.tensor(case['bias'], dtype=torch.float64))
    return m.train(case['training'])


def flat_ndhwc(t):
    return t.permute(0, 2, 3, 4, 1).contiguous().reshape(-1).tolist()


def main():
    out = {}
    for case in json.load(sys.stdin)['cases']:
        n, d, h, w, c = case['shape']
        m = module_for(case, c)
        ncdhw = lambda v: torch.tensor(v, dtype=torch.float64).reshape(n, d, h, w, c).permute(0, 4, 1, 2, 3).contiguous()
        x = ncdhw(case['x']).requires_grad_(True)
        y = m(x)
        if case['relu']:
            y = torch.relu(y)
        (y * ncdhw(case['probe'])).sum().backward()
        r = {'y': flat_ndhwc(y.detach()), 'dx': flat_ndhwc(x.grad), 'dweight': m.weight.grad.tolist(), 'dbias': m.bias.grad.tolist()}
        if case['module'] == 'batch_norm':
            r['running_mean'] = m.running_mean.tolist()
            r['running_var'] = m.running_var.tolist()
        out[case['name']] = r
    json.dump(out, sys.stdout)


if __name__ == '__main__':
    main()

#!/usr/bin/python3
"""PyTorch optimiser trajectories for shared/model/optim.ts (torch.optim.SGD with momentum and weight decay,
torch.optim.Adam with weight decay), four steps on fixed gradients. Debian python3-torch, from the repo root:

    /usr/bin/python3 scripts/make_optim_fixtures.py > test/fixtures/optim.json
"""
import json

import torch

torch.manual_seed(5)
w0 = torch.randn(6)
grads = [torch.randn(6) for _ in range(4)]
out = {'w0': w0.tolist(), 'grads': [g.tolist() for g in grads], 'runs': []}
for name, make in [
    ('sgd', lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)),
    ('sgd-plain', lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.0)),
    ('adam', lambda p: torch.optim.Adam([p], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)),
]:
    p = torch.nn.Parameter(w0.clone())
    opt = make(p)
    steps = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        steps.append(p.detach().tolist())
    out['runs'].append({'name': name, 'steps': steps})
print(json.dumps(out))

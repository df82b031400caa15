#!/usr/bin/python3
"""One forward + backward of MedFL's Med3D (GroupNorm, U-Net head) in float64 PyTorch, as the reference of
test/model/med3d-unet-torch.test.ts. Usage: med3d_unet_grads.py DIR. DIR/manifest.json names the architecture
({"depth", "shortcut", "base", "channels", "classes", "groups", "input": [N, D, H, W]}) and the parameters
([{"name", "shape"}] in MedFL's names and layouts, each in DIR/<name>.f32 as raw float32); DIR/input.f32 is the
NDHWC image (one channel), DIR/probe.f32 the NDHWC weights of the loss sum(out * probe). Writes DIR/out.f64 (the
logits, NDHWC) and DIR/grad/<name>.f64 (each parameter's gradient in MedFL's layout), raw float64."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from med3d_unet import Med3dUnet  # noqa: E402


def load(path, shape):
    with open(path, 'rb') as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.float32).reshape(shape).double()


def main():
    d = sys.argv[1]
    with open(os.path.join(d, 'manifest.json')) as f:
        m = json.load(f)
    model = Med3dUnet(m['depth'], m['shortcut'], m['base'], m['channels'], m['classes'], m['groups']).double()
    state = model.state_dict()
    params = dict(model.named_parameters())
    names = {}
    for p in m['params']:
        name = p['name']
        torch_name = ('enc.' + name[len('encoder.'):]) if name.startswith('encoder.') else ('dec.' + name[len('head.dec.'):])
        value = load(os.path.join(d, name + '.f32'), p['shape'])
        # MedFL keeps conv weights [k, k, k, in, out] and transposed-conv weights [k, k, k, out, in]; PyTorch's are
        # [out, in, k, k, k] and [in, out, k, k, k]: the same permutation both ways.
        if value.dim() == 5:
            value = value.permute(4, 3, 0, 1, 2)
        if tuple(value.shape) != tuple(state[torch_name].shape):
            raise SystemExit(f'{name}: shape {tuple(value.shape)} does not fit {torch_name} {tuple(state[torch_name].shape)}')
        with torch.no_grad():
            params[torch_name].copy_(value)
        names[torch_name] = name
    if len(names) != len(params):
        raise SystemExit(f'parameters without a value: {sorted(set(params) - set(names))}')
    n, D, H, W = m['input']
    x = load(os.path.join(d, 'input.f32'), [n, D, H, W, 1]).permute(0, 4, 1, 2, 3).contiguous()
    model.train()
    out = model(x).permute(0, 2, 3, 4, 1)
    probe = load(os.path.join(d, 'probe.f32'), list(out.shape))
    (out * probe).sum().backward()
    out.detach().contiguous().numpy().tofile(os.path.join(d, 'out.f64'))
    os.makedirs(os.path.join(d, 'grad'), exist_ok=True)
    for torch_name, p in params.items():
        g = p.grad
        if g.dim() == 5:
            g = g.permute(2, 3, 4, 1, 0)
        g.contiguous().numpy().tofile(os.path.join(d, 'grad', names[torch_name] + '.f64'))


if __name__ == '__main__':
    main()

#!/usr/bin/python3
"""Training-mode reference for MedFL's Med3D engine: one forward + backward in PyTorch, train mode.

Run from the repository root with Debian's PyTorch (torch + numpy only):

    /usr/bin/python3 scripts/make_med3d_train_fixtures.py [--out test/fixtures/med3d-train]

For each model (MedicalNet layout from make_med3d_fixtures.py, tiny widths), with weights and BatchNorm
statistics made non-trivial the same way, in train() mode (batch statistics, running-statistics update):
  <name>.before.safetensors  state_dict before the step (PyTorch names and layouts)
  <name>.grad.safetensors    gradient of loss = sum(seg * probe) for every trained parameter
  <name>.after.safetensors   running_mean / running_var after the forward (momentum 0.1, unbiased var)
  <name>.seg.npy             forward output [N, classes, D', H', W'] (NCDHW)
Shared: input.npy [2, 1, 20, 24, 28] and <name>.probe.npy (the random weights of the scalar loss).
The step itself runs in float64 (weights and input are float32 values), so the references are nearly exact.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
from fixture_io import nontrivial_bn, write_npy, write_safetensors  # noqa: E402
from make_med3d_fixtures import Med3d  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default='test/fixtures/med3d-train')
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(20251125)
    gen = torch.Generator().manual_seed(11)
    # 20→10→5→5→3 (odd sizes through the strided layers), D≠H≠W, batch 2 for batch statistics.
    shape = (2, 1, 20, 24, 28)
    x = torch.randn(*shape, generator=gen)
    write_npy(os.path.join(args.out, 'input.npy'), x.numpy())
    for name, depth, shortcut, wm, hc in [('r10-A', 10, 'A', 0.0625, 3), ('r10-B', 10, 'B', 0.0625, 3), ('r18-A', 18, 'A', 0.0625, 3), ('r50-B', 50, 'B', 0.03125, 2)]:
        base = max(1, round(64 * wm))
        model = Med3d(depth, shortcut, base=base, head_channels=hc, num_seg_classes=2)

        def batch():
            return model(torch.randn(*shape, generator=gen))

        nontrivial_bn(model, gen, nn.BatchNorm3d, batch)
        before = {k: v.clone().numpy() for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
        # The reference step runs in float64, so it is (nearly) exact: what remains in a comparison is the
        # float32 rounding of the engine under test, not PyTorch's own.
        model.double().train()
        seg = model(x.double())
        probe = torch.randn(*seg.shape, generator=gen, dtype=torch.float64)
        (seg * probe).sum().backward()
        grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
        after = {k: v.numpy() for k, v in model.state_dict().items() if k.endswith('running_mean') or k.endswith('running_var')}
        meta = {'format': 'pytorch-state-dict', 'architecture': 'med3d', 'torch': torch.__version__,
                'med3d': json.dumps({'depth': depth, 'shortcut': shortcut, 'widthMultiplier': wm,
                                     'head': {'kind': 'segmentation', 'numClasses': 2, 'channels': hc}})}
        write_safetensors(os.path.join(args.out, f'{name}.before.safetensors'), before, meta)
        write_safetensors(os.path.join(args.out, f'{name}.grad.safetensors'), grads, meta)
        write_safetensors(os.path.join(args.out, f'{name}.after.safetensors'), after, meta)
        write_npy(os.path.join(args.out, f'{name}.seg.npy'), seg.detach().numpy())
        write_npy(os.path.join(args.out, f'{name}.probe.npy'), probe.numpy())
        print(f'{name}: seg {tuple(seg.shape)}, {len(grads)} gradients', file=sys.stderr)


if __name__ == '__main__':
    main()

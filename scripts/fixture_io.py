"""Writers shared by the fixture scripts: .npy and safetensors (by hand, so numpy + torch are all they need)."""
import json
import struct

import numpy as np
import torch


def write_npy(path, arr):
    np.save(path, np.ascontiguousarray(arr, dtype='<f4'), allow_pickle=False)


def write_safetensors(path, tensors, metadata):
    """safetensors by hand: u64 LE header length, JSON header, raw little-endian float32 data, 8-byte aligned."""
    header = {'__metadata__': metadata}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype='<f4')
        b = a.tobytes()
        header[name] = {'dtype': 'F32', 'shape': list(a.shape), 'data_offsets': [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    js = json.dumps(header, separators=(',', ':'))
    js += ' ' * ((8 - (8 + len(js.encode())) % 8) % 8)
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(js.encode())))
        f.write(js.encode())
        for b in blobs:
            f.write(b)


def nontrivial_bn(model, gen, bn_type, run_batch):
    """BatchNorm statistics from three real train-mode batches (`run_batch()`), so activations keep a sane
    scale, then perturbed, with random γ/β: a forward that loses, misplaces or mis-applies any BN tensor
    (batch instead of running statistics, eps or γ/β in the wrong place) would not reproduce the outputs."""
    for m in model.modules():
        if isinstance(m, bn_type):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(3):
            run_batch()
        for m in model.modules():
            if isinstance(m, bn_type):
                c = m.num_features
                m.running_mean.add_(0.1 * torch.randn(c, generator=gen) * m.running_var.sqrt())
                m.running_var.mul_(0.7 + 0.6 * torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.2 * torch.randn(c, generator=gen))
                m.momentum = 0.1
    model.eval()

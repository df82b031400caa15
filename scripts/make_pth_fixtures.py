#!/usr/bin/python3
"""Write the small PyTorch checkpoint fixtures in test/fixtures/pth/ (see the README there).

Run with Debian's python3-torch (PyTorch 1.13, CPU):  /usr/bin/python3 scripts/make_pth_fixtures.py
Values are seeded and reproducible; the legacy file's storage keys (memory addresses) and the TorchScript
archive's timestamps differ between runs. Expected values are written to expected.json next to the files.
"""
import collections
import io
import json
import os
import pickle
import struct
import sys
import zipfile

import torch
import torch.nn as nn

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'test', 'fixtures', 'pth')
# The malicious fixtures would create this file if anything executed their payload.
PWNED = '/tmp/medfl-pickle-pwned'


class Tiny(nn.Module):
    """MedicalNet-shaped names: conv1/bn1 (stem), layer1.0.conv1 (block), conv_seg (head), fc (dense)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(2, 3, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(3)
        self.layer1 = nn.Sequential(nn.Sequential())
        self.layer1[0].conv1 = nn.Conv3d(3, 4, kernel_size=(1, 2, 3), bias=True)
        self.conv_seg = nn.Sequential(
            nn.ConvTranspose3d(4, 2, kernel_size=(2, 3, 2), stride=2),
            nn.BatchNorm3d(2),
            nn.ReLU(inplace=True),
            nn.Conv3d(2, 5, kernel_size=1, bias=False),
        )
        self.fc = nn.Linear(4, 3)


def values(t):
    """Flattened C-order values as Python numbers (exact for float32/float16/bfloat16 via float64)."""
    t = t.detach().contiguous()
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return [float(v) for v in t.float().reshape(-1).tolist()]
    if t.dtype == torch.float64:
        return [float(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t.reshape(-1).tolist()]


def describe(sd):
    return {k: {'dtype': str(v.dtype).replace('torch.', ''), 'shape': list(v.shape), 'values': values(v)} for k, v in sd.items()}


def primitive_object(proto):
    """Plain data only. bytes need protocol >= 3 and sets >= 4 (older protocols pickle them through
    _codecs.encode / builtins.set, which the restricted reader refuses like any other global)."""
    shared = ['shared', 1]
    obj = {
        'ints': [0, 1, -1, 255, 256, 65535, 65536, -2**31, 2**31 - 1, 2**31, 2**53 - 1, -2**63, 2**64 + 5, -10**30],
        'floats': [0.0, 1.5, -2.25e-300, 1e308, 3.141592653589793, 5e-324],
        'strings': ['', 'abc', 'ünïcødé ✓ \\u0041 \U0001F600', 'line\nbreak', 'x' * 300],
        'tuples': (1, (2, 3), (), (4,), (5, 6, 7), (8, 9, 10, 11)),
        'none': None,
        'bools': [True, False],
        'nested': {'a': [1, {'b': (None,)}], 1: 'int key', 2.5: 'float key', None: 'none key'},
        'od': collections.OrderedDict([('z', 1), ('a', 2)]),
        'memo': [shared, shared, 'again', 'again'],
        'long_list': list(range(1200)),
    }
    if proto >= 3:
        obj['bytes'] = [b'', b'\x00\x01\xff', bytes(range(256)) * 2]
    if proto >= 4:
        obj['sets'] = [{3, 1, 2}, frozenset({'a'})]
    return obj


def canonical(v):
    """The JSON form test/checkpoints/pth.test.ts builds from the TypeScript unpickler's output."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v if abs(v) <= 2**53 - 1 else {'int': str(v)}
    if isinstance(v, float):
        return v
    if isinstance(v, bytes):
        return {'bytes': v.hex()}
    if isinstance(v, tuple):
        return {'tuple': [canonical(x) for x in v]}
    if isinstance(v, list):
        return [canonical(x) for x in v]
    if isinstance(v, (set, frozenset)):
        return {'frozenset' if isinstance(v, frozenset) else 'set': sorted(canonical(x) for x in v)}
    if isinstance(v, dict):
        kind = 'odict' if isinstance(v, collections.OrderedDict) else 'dict'
        return {kind: [[canonical(k), canonical(x)] for k, x in v.items()]}
    raise TypeError(type(v))


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(1234)
    model = Tiny()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    model.eval()
    sd = collections.OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())

    # --- MedicalNet-style checkpoint with every awkward case PyTorch can produce -------------------
    quirky = collections.OrderedDict()
    shared = torch.zeros(64)  # one storage, several tensors at different offsets
    for k, v in sd.items():
        if k == 'conv1.weight':
            # Non-contiguous: stored as the permuted view of a [kD,kH,kW,in,out] contiguous tensor.
            base = v.permute(2, 3, 4, 1, 0).contiguous()
            view = base.permute(4, 3, 0, 1, 2)
            assert not view.is_contiguous() and torch.equal(view, v)
            quirky[k] = view
        elif k == 'bn1.weight':
            shared[5:8] = v
            quirky[k] = shared[5:8]          # storage offset 5
        elif k == 'bn1.bias':
            shared[20:26:2] = v
            quirky[k] = shared[20:26:2]      # storage offset 20, stride 2
        elif k == 'bn1.running_var':
            quirky[k] = v.double()           # float64
        elif k == 'conv_seg.1.running_mean':
            quirky[k] = v.half()             # float16
        elif k == 'conv_seg.1.running_var':
            quirky[k] = v.bfloat16()         # bfloat16
        elif k == 'fc.weight':
            quirky[k] = nn.Parameter(v.clone(), requires_grad=True)  # pickled via _rebuild_parameter
        else:
            quirky[k] = v
    # what a reader must return (values after each tensor's own dtype, C order)
    expected_sd = describe(quirky)
    prefixed = collections.OrderedDict(('module.' + k, v) for k, v in quirky.items())
    ckpt = {'state_dict': prefixed, 'epoch': 199, 'arch': 'tiny'}

    torch.save(ckpt, os.path.join(OUT, 'medicalnet_tiny.pth'))
    torch.save(ckpt, os.path.join(OUT, 'medicalnet_tiny_legacy.pth'), _use_new_zipfile_serialization=False)
    # plain state dict, no prefix, all contiguous float32 / int64
    torch.save(model.state_dict(), os.path.join(OUT, 'plain_state_dict.pth'))  # keeps _metadata (BUILD)
    # round trip through torch.load, as a self-check of what we claim
    back = torch.load(os.path.join(OUT, 'medicalnet_tiny_legacy.pth'))
    for k, v in quirky.items():
        assert torch.equal(back['state_dict']['module.' + k], v), k

    # --- a whole pickled module (not a state dict) and a TorchScript archive: both refused --------
    torch.save(model, os.path.join(OUT, 'whole_module.pth'))
    torch.jit.save(torch.jit.script(model.conv1), os.path.join(OUT, 'torchscript_conv.pt'))

    # --- malicious files: GLOBAL os.system / builtins.eval / subprocess.Popen + REDUCE -----------
    cmd = 'touch ' + PWNED
    # (1) torch zip layout, data.pkl = protocol 2:  GLOBAL 'os system', ('touch …',), REDUCE
    evil = (b'\x80\x02' + b'cos\nsystem\n' + b'X' + struct.pack('<I', len(cmd)) + cmd.encode()
            + b'\x85' + b'R' + b'.')
    with zipfile.ZipFile(os.path.join(OUT, 'malicious_os_system.pth'), 'w', zipfile.ZIP_STORED) as z:
        for name, data in (('archive/data.pkl', evil), ('archive/version', b'3\n')):
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    # (2) legacy layout (magic, protocol, sys info) followed by a protocol-4 STACK_GLOBAL builtins.eval
    code = "__import__('os').system('" + cmd + "')"
    buf = io.BytesIO()
    for obj in (0x1950a86a20f9469cfc6c, 1001, {'protocol_version': 1001, 'little_endian': True,
                                                'type_sizes': {'short': 2, 'int': 4, 'long': 8}}):
        pickle.dump(obj, buf, protocol=2)
    body = (b'\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94'
            + b'\x8c' + bytes([len(code)]) + code.encode() + b'\x94\x85\x94R\x94.')
    buf.write(b'\x80\x04\x95' + struct.pack('<Q', len(body)) + body)
    with open(os.path.join(OUT, 'malicious_legacy_eval.pth'), 'wb') as f:
        f.write(buf.getvalue())

    # (3) an ordinary-looking state dict with one value whose __reduce__ runs subprocess.Popen
    class Exploit:
        def __reduce__(self):
            import subprocess
            return (subprocess.Popen, (['touch', PWNED],))
    evil_sd = collections.OrderedDict([('conv1.weight', torch.ones(1)), ('bn1.weight', Exploit())])
    torch.save(evil_sd, os.path.join(OUT, 'malicious_popen_in_state_dict.pth'))
    assert not os.path.exists(PWNED), 'a fixture payload ran while writing the fixtures'

    # --- safetensors with mixed dtypes (written by hand: the format is a JSON header + raw data) -
    st_tensors = collections.OrderedDict([
        ('conv1.weight', sd['conv1.weight']),
        ('bn1.running_var', sd['bn1.running_var'].double()),
        ('bn1.num_batches_tracked', sd['bn1.num_batches_tracked']),
        ('conv_seg.1.running_mean', sd['conv_seg.1.running_mean'].half()),
    ])
    names = {torch.float32: 'F32', torch.float64: 'F64', torch.int64: 'I64', torch.float16: 'F16'}
    header, blobs, off = {'__metadata__': {'format': 'pt'}}, [], 0
    for k, v in st_tensors.items():
        b = v.contiguous().numpy().tobytes()
        header[k] = {'dtype': names[v.dtype], 'shape': list(v.shape), 'data_offsets': [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    hj = json.dumps(header).encode()
    hj += b' ' * ((8 - (8 + len(hj)) % 8) % 8)
    with open(os.path.join(OUT, 'mixed_dtypes.safetensors'), 'wb') as f:
        f.write(struct.pack('<Q', len(hj)) + hj + b''.join(blobs))

    # --- plain-data pickles in every protocol, for the unpickler's opcode coverage -----------------
    primitives = {}
    for proto in range(6):
        obj = primitive_object(proto)
        with open(os.path.join(OUT, 'primitives_p%d.pkl' % proto), 'wb') as f:
            pickle.dump(obj, f, protocol=proto)
        primitives[str(proto)] = canonical(obj)

    # --- numerical layout checks: torch's own outputs for one Conv3d and one ConvTranspose3d -----
    torch.manual_seed(99)
    x_conv = torch.randn(1, 3, 3, 4, 5)  # input of layer1.0.conv1 (3 -> 4, kernel (1,2,3), valid)
    y_conv = model.layer1[0].conv1(x_conv)
    x_convt = torch.randn(1, 4, 2, 3, 2)  # input of conv_seg.0 (4 -> 2, kernel (2,3,2), stride 2)
    y_convt = model.conv_seg[0](x_convt)
    x_lin = torch.randn(2, 4)
    y_lin = model.fc(x_lin)
    t = lambda a: {'shape': list(a.shape), 'values': values(a)}
    numerics = {
        'conv': {'key': 'layer1.0.conv1', 'x': t(x_conv), 'y': t(y_conv)},
        'convTranspose': {'key': 'conv_seg.0', 'stride': [2, 2, 2], 'x': t(x_convt), 'y': t(y_convt)},
        'linear': {'key': 'fc', 'x': t(x_lin), 'y': t(y_lin)},
    }
    with open(os.path.join(OUT, 'expected.json'), 'w') as f:
        json.dump({
            'torch_version': torch.__version__,
            'medicalnet_tiny': expected_sd,           # keys without the 'module.' prefix
            'plain_state_dict': describe(sd),
            'mixed_dtypes': describe(st_tensors),
            'primitives': primitives,
            'numerics': numerics,
        }, f, indent=None, separators=(',', ':'))
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print('wrote', sorted(os.listdir(OUT)), 'total', total, 'bytes', file=sys.stderr)


if __name__ == '__main__':
    with torch.no_grad():
        main()

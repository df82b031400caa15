"""Writers shared by the fixture scripts: .npy and safetensors (by hand, so numpy + torch are all they need)."""
import json
import struct

import numpy as np


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

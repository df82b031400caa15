#!/usr/bin/python3
"""NIfTI reader fixtures: a few small generated files plus expected values for all fixtures, from nibabel.

Run from the repository root with Debian's nibabel (apt-get install python3-nibabel; nothing else needed):

    /usr/bin/python3 scripts/make_nifti_fixtures.py [--out test/fixtures/nifti]

It writes
  gen_int32_scaled_qform.nii.gz  NIfTI-1 LE int32 5x6x7, scl_slope 0.5 / scl_inter -10, qform only (sform_code 0),
                                 axes P,S,L (permuted and flipped against RAS)
  gen_float64_be_oblique.nii     NIfTI-1 BIG-endian float64 4x3x5, sform 10 degrees oblique (closest axes L,P,S),
                                 qform set to something else (the sform must win)
  gen_nifti2_uint8.nii.gz        NIfTI-2 LE uint8 6x5x4, sform with the z axis flipped (R,A,I)
  expected.json                  for these and the nibabel files already here (see README.md): header facts,
                                 sums and sample voxels as nibabel reads them (get_fdata, x fastest), and the
                                 same after nibabel.as_closest_canonical (RAS+)

The files are written header-first by hand (nibabel's header object, then raw bytes in Fortran order), so the
stored scl_slope/scl_inter are exactly the ones chosen here; nibabel then reads them back for the expectations.
"""
import argparse
import json
import math
import os

import numpy as np
import nibabel as nib


def write_raw(path, hdr_cls, endian, shape, dtype, values, qform=None, sform=None, slope=None, inter=None):
    hdr = hdr_cls(endianness=endian)
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    if qform is not None:
        hdr.set_qform(qform, code=1)
    else:
        hdr['qform_code'] = 0
    if sform is not None:
        hdr.set_sform(sform, code=2)
    else:
        hdr['sform_code'] = 0
    # pixdim from whichever transform is set (sform preferred), as a writer would
    src = sform if sform is not None else qform
    hdr.set_zooms(tuple(float(np.linalg.norm(src[:3, i])) for i in range(3)))
    if slope is not None:
        hdr['scl_slope'] = slope
        hdr['scl_inter'] = inter
    else:
        hdr['scl_slope'] = np.nan
        hdr['scl_inter'] = np.nan
    off = 352 if hdr_cls is nib.Nifti1Header else 544
    hdr['vox_offset'] = off
    block = hdr.binaryblock
    data = np.asarray(values).astype(np.dtype(dtype).newbyteorder(endian)).tobytes(order='F')
    raw = block + b'\0' * (off - len(block)) + data
    if path.endswith('.gz'):
        import gzip
        with open(path, 'wb') as fh, gzip.GzipFile(filename='', mode='wb', fileobj=fh, compresslevel=6, mtime=0) as f:
            f.write(raw)
    else:
        with open(path, 'wb') as f:
            f.write(raw)


def rot_z(deg):
    t = math.radians(deg)
    return np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])


def make_generated(out):
    rng = np.random.default_rng(20261125)
    # 1: int32 with scaling, qform only, axes P S L
    a = np.zeros((4, 4))
    a[:3, 0] = [0, -2.0, 0]
    a[:3, 1] = [0, 0, 3.0]
    a[:3, 2] = [-1.5, 0, 0]
    a[:3, 3] = [10, 20, -30]
    a[3, 3] = 1
    v = rng.integers(-3000, 3000, size=(5, 6, 7)).astype(np.int32)
    write_raw(os.path.join(out, 'gen_int32_scaled_qform.nii.gz'), nib.Nifti1Header, '<', (5, 6, 7), np.int32, v,
              qform=a, slope=0.5, inter=-10.0)
    # 2: big-endian float64, oblique sform (LPS-ish rotated 10 degrees about z), different qform
    m = rot_z(10) @ np.diag([-1.0, -1.2, 2.5])
    s = np.eye(4)
    s[:3, :3] = m
    s[:3, 3] = [5, -7, 9]
    q = np.diag([1.0, 1.2, 2.5, 1.0])
    v = rng.normal(100, 30, size=(4, 3, 5))
    write_raw(os.path.join(out, 'gen_float64_be_oblique.nii'), nib.Nifti1Header, '>', (4, 3, 5), np.float64, v,
              qform=q, sform=s)
    # 3: NIfTI-2 uint8, z flipped
    s = np.diag([0.8, 0.9, -1.7, 1.0])
    s[:3, 3] = [-3, 4, 12]
    v = rng.integers(0, 4, size=(6, 5, 4)).astype(np.uint8)
    write_raw(os.path.join(out, 'gen_nifti2_uint8.nii.gz'), nib.Nifti2Header, '<', (6, 5, 4), np.uint8, v, sform=s)


def sums(arr):
    flat = np.asarray(arr, dtype=np.float64).ravel(order='F')
    w = (np.arange(flat.size) % 7) + 1
    return float(flat.sum()), float((flat * w).sum())


def samples(arr):
    sh = arr.shape
    pts = [(0, 0, 0), (sh[0] - 1, sh[1] - 1, sh[2] - 1), (sh[0] // 2, sh[1] // 3, sh[2] - 1), (1 % sh[0], 0, sh[2] // 2)]
    return [[int(x), int(y), int(z), float(arr[x, y, z])] for x, y, z in pts]


def describe(path, frame):
    img = nib.load(path)
    hdr = img.header
    if len(img.shape) > 3:
        img = img.slicer[..., frame]
    data = img.get_fdata(dtype=np.float64)
    sform_code = int(hdr['sform_code'])
    qform_code = int(hdr['qform_code'])
    src = 'sform' if sform_code > 0 else 'qform' if qform_code > 0 else 'pixdim'
    can = nib.as_closest_canonical(img)
    cdata = can.get_fdata(dtype=np.float64)
    s, ws = sums(data)
    cs, cws = sums(cdata)
    return {
        'version': 2 if isinstance(hdr, nib.Nifti2Header) else 1,
        'littleEndian': hdr.endianness == '<',
        'datatype': str(hdr.get_data_dtype().newbyteorder('=').name),
        'frame': frame,
        'dims': [int(d) for d in data.shape],
        'spacing': [float(z) for z in hdr.get_zooms()[:3]],
        'affineSource': src,
        'affine': img.affine.tolist(),
        'axcodes': ''.join(nib.aff2axcodes(img.affine)),
        'sum': s, 'wsum': ws,
        'samples': samples(data),
        'canonical': {
            'dims': [int(d) for d in cdata.shape],
            'spacing': [float(z) for z in can.header.get_zooms()[:3]],
            'affine': can.affine.tolist(),
            'sum': cs, 'wsum': cws,
            'samples': samples(cdata),
        },
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default='test/fixtures/nifti')
    out = ap.parse_args().out
    make_generated(out)
    files = {
        'anatomical.nii': 0, 'reoriented_anat_moved.nii': 0, 'standard.nii.gz': 0, 'example_nifti2.nii.gz': 1,
        'gen_int32_scaled_qform.nii.gz': 0, 'gen_float64_be_oblique.nii': 0, 'gen_nifti2_uint8.nii.gz': 0,
    }
    result = {'generator': 'scripts/make_nifti_fixtures.py', 'nibabel': nib.__version__,
              'weights': 'wsum = sum(v[i] * (i % 7 + 1)) over the x-fastest (Fortran) flattening',
              'files': {f: describe(os.path.join(out, f), fr) for f, fr in files.items()}}
    with open(os.path.join(out, 'expected.json'), 'w') as fh:
        json.dump(result, fh, indent=1)
        fh.write('\n')


if __name__ == '__main__':
    main()

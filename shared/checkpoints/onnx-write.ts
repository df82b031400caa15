/**
 * A Med3D model (encoder, optionally with its head) as an ONNX graph, for inference servers and tools outside
 * MedFL (onnxruntime, TensorRT, OpenVINO, Netron). Eval mode, PyTorch semantics, standard opset-17 operators only:
 *
 *   input   "input"  float32 [N, C, D, H, W] (NCDHW as PyTorch/MONAI; N, D, H, W symbolic, C the model's channels)
 *   output  "features" (encoder only: layer4, [N, 8P·e, ⌈D/8⌉, …]) or "logits" (segmentation: ¼ grid; U-Net: the
 *           input grid; classification: [N, classes])
 *   Conv (weights [out, in, k, k, k], pads = PyTorch padding, dilations), BatchNormalization (running statistics,
 *   eps 1e-5), MaxPool 3/2/1 (ONNX, like PyTorch, never picks padding), Add + Relu, ConvTranspose 2/2 with bias,
 *   Concat (U-Net skips), GlobalAveragePool + Flatten + Gemm (classification).
 *   Shortcut A: Slice with steps = stride (a 1³ average pool is a subsample) and Pad with zero channels.
 *   Norm layers write their own nodes (NormLayer.onnx, shared/model/layers/): BatchNormalization for BatchNorm; for
 *   GroupNorm / InstanceNorm Reshape to [N, G, −1], InstanceNormalization (the per-group statistics), Reshape back,
 *   Mul γ and Add β per channel.
 *
 * Weights go in as initializers in PyTorch layouts (med3dToTorch), so ONNX and `model export --format torch` hold
 * the same numbers. Encoded with protobufjs from shared/checkpoints/onnx-subset.proto.
 */
import { readFileSync } from 'node:fs';
import protobuf from 'protobufjs';
import { med3dNameToTorch, med3dNormGroups, med3dToTorch, type Med3dArchitecture } from '../model/med3d.ts';
import { normLayer } from '../model/layers/norm-layers.ts';
import type { TensorBundle } from '../tensors/bundle.ts';

/** ONNX TensorProto.DataType values used here. */
const FLOAT = 1;
const INT64 = 7;
/** AttributeProto.AttributeType values used here. */
const ATTR = { FLOAT: 1, INT: 2, INTS: 7 } as const;
export const ONNX_OPSET = 17;
/** IR version 8 goes with opsets up to 18. */
export const ONNX_IR_VERSION = 8;

let modelType: protobuf.Type | undefined;
/** The ModelProto message type (parsed once from the .proto subset). */
export function onnxModelType(): protobuf.Type {
  if (!modelType) {
    const text = readFileSync(new URL('./onnx-subset.proto', import.meta.url), 'utf8');
    modelType = protobuf.parse(text, { keepCase: true }).root.lookupType('medfl.onnx.ModelProto');
  }
  return modelType;
}

type Attr = { name: string; type: number; i?: number; f?: number; ints?: number[] };
interface Node {
  op_type: string;
  input: string[];
  output: string[];
  name: string;
  attribute: Attr[];
}
interface Initializer {
  name: string;
  dims: number[];
  data_type: number;
  raw_data: Uint8Array;
}

const ints = (name: string, v: number[]): Attr => ({ name, type: ATTR.INTS, ints: v });
const int = (name: string, v: number): Attr => ({ name, type: ATTR.INT, i: v });
const float = (name: string, v: number): Attr => ({ name, type: ATTR.FLOAT, f: v });

function floatBytes(data: Float32Array): Uint8Array {
  const out = new Uint8Array(data.length * 4);
  const dv = new DataView(out.buffer);
  for (let i = 0; i < data.length; i++) dv.setFloat32(4 * i, data[i], true);
  return out;
}

function int64Bytes(values: readonly number[]): Uint8Array {
  const out = new Uint8Array(values.length * 8);
  const dv = new DataView(out.buffer);
  values.forEach((v, i) => dv.setBigInt64(8 * i, BigInt(v), true));
  return out;
}

class GraphBuilder {
  readonly nodes: Node[] = [];
  readonly initializers: Initializer[] = [];
  private readonly names = new Set<string>();
  private counter = 0;

  constructor(private readonly weights: ReadonlyMap<string, { shape: readonly number[]; data: Float32Array }>) {}

  /** The initializer of a model parameter (PyTorch name and layout), added once. */
  param(torchName: string): string {
    if (!this.names.has(torchName)) {
      const t = this.weights.get(torchName);
      if (!t) throw new Error(`onnx export: missing tensor ${torchName}`);
      this.initializers.push({ name: torchName, dims: [...t.shape], data_type: FLOAT, raw_data: floatBytes(t.data) });
      this.names.add(torchName);
    }
    return torchName;
  }

  /** A constant made for the graph (shapes, pads, per-channel vectors). */
  constant(prefix: string, dims: number[], values: Float32Array | readonly number[], type: typeof FLOAT | typeof INT64): string {
    const name = `${prefix}__const${this.counter++}`;
    const raw = type === FLOAT ? floatBytes(values instanceof Float32Array ? values : Float32Array.from(values)) : int64Bytes([...values]);
    this.initializers.push({ name, dims, data_type: type, raw_data: raw });
    this.names.add(name);
    return name;
  }

  node(op: string, inputs: string[], name: string, attribute: Attr[] = []): string {
    const out = `${name}__out${this.counter++}`;
    this.nodes.push({ op_type: op, input: inputs, output: [out], name, attribute });
    return out;
  }
}

/**
 * The ONNX ModelProto bytes of `arch` with `bundle`'s weights (MedFL names; every encoder tensor, and every head
 * tensor when `withHead`).
 */
export function encodeMed3dOnnx(arch: Med3dArchitecture, bundle: TensorBundle, opts: { withHead: boolean; producerVersion?: string; docString?: string }): Uint8Array {
  const cfg = arch.config;
  const weights = new Map(med3dToTorch(bundle).map((t) => [t.name, t]));
  const g = new GraphBuilder(weights);
  const w = (medflName: string) => g.param(med3dNameToTorch(medflName));
  const channelsOf = new Map<string, number>();

  const conv = (x: string, name: string, o: { stride?: number; pad?: number; dilation?: number } = {}): string => {
    const t = weights.get(med3dNameToTorch(`${name}.weight`));
    if (!t) throw new Error(`onnx export: missing tensor ${name}.weight`);
    const k = t.shape[2];
    const p = o.pad ?? 0;
    const d = o.dilation ?? 1;
    const y = g.node('Conv', [x, w(`${name}.weight`)], name, [ints('kernel_shape', [k, k, k]), ints('strides', [o.stride ?? 1, o.stride ?? 1, o.stride ?? 1]), ints('pads', [p, p, p, p, p, p]), ints('dilations', [d, d, d])]);
    channelsOf.set(y, t.shape[0]);
    return y;
  };
  const relu = (x: string, name: string) => {
    const y = g.node('Relu', [x], `${name}/relu`);
    channelsOf.set(y, channelsOf.get(x)!);
    return y;
  };
  const layer = normLayer(cfg.norm);
  const norm = (x: string, prefix: string, withRelu: boolean): string => {
    const C = channelsOf.get(x)!;
    // The layer writes its own nodes (shared/model/layers/).
    const y = layer.onnx(
      {
        prefix,
        channels: C,
        param: (s) => w(`${prefix}.${s}`),
        value: (s) => bundle.get(`${prefix}.${s}`)!.data,
        floatConstant: (dims, values) => g.constant(prefix, dims, values, FLOAT),
        int64Constant: (dims, values) => g.constant(prefix, dims, values, INT64),
        node: (op, inputs, name, floats = {}) => g.node(op, inputs, name, Object.entries(floats).map(([k, v]) => float(k, v))),
      },
      x,
      med3dNormGroups(cfg, C),
    );
    channelsOf.set(y, C);
    return withRelu ? relu(y, prefix) : y;
  };
  const convTranspose = (x: string, name: string): string => {
    const t = weights.get(med3dNameToTorch(`${name}.weight`))!;
    const y = g.node('ConvTranspose', [x, w(`${name}.weight`), w(`${name}.bias`)], name, [ints('kernel_shape', [2, 2, 2]), ints('strides', [2, 2, 2])]);
    channelsOf.set(y, t.shape[1]);
    return y;
  };
  const concat = (a: string, b: string, name: string): string => {
    const y = g.node('Concat', [a, b], name, [int('axis', 1)]);
    channelsOf.set(y, channelsOf.get(a)! + channelsOf.get(b)!);
    return y;
  };

  const input = 'input';
  channelsOf.set(input, cfg.inChannels);
  const stem = norm(conv(input, 'encoder.conv1', { stride: 2, pad: 3 }), 'encoder.bn1', true);
  let y = g.node('MaxPool', [stem], 'encoder.maxpool', [ints('kernel_shape', [3, 3, 3]), ints('strides', [2, 2, 2]), ints('pads', [1, 1, 1, 1, 1, 1])]);
  channelsOf.set(y, cfg.basePlanes);
  let layer1 = y;
  for (const b of cfg.blocks) {
    const d = b.dilation;
    let out: string;
    if (cfg.block === 'basic') {
      out = norm(conv(y, `${b.prefix}.conv1`, { stride: b.stride, dilation: d, pad: d }), `${b.prefix}.bn1`, true);
      out = norm(conv(out, `${b.prefix}.conv2`, { dilation: d, pad: d }), `${b.prefix}.bn2`, false);
    } else {
      out = norm(conv(y, `${b.prefix}.conv1`), `${b.prefix}.bn1`, true);
      out = norm(conv(out, `${b.prefix}.conv2`, { stride: b.stride, dilation: d, pad: d }), `${b.prefix}.bn2`, true);
      out = norm(conv(out, `${b.prefix}.conv3`), `${b.prefix}.bn3`, false);
    }
    let residual = y;
    if (b.downsample === 'B') {
      residual = norm(conv(y, `${b.prefix}.downsample.0`, { stride: b.stride }), `${b.prefix}.downsample.1`, false);
    } else if (b.downsample === 'A') {
      const s = b.stride;
      let sub = y;
      if (s !== 1) {
        const big = 2 ** 62; // "to the end" for Slice
        sub = g.node(
          'Slice',
          [y, g.constant(b.prefix, [3], [0, 0, 0], INT64), g.constant(b.prefix, [3], [big, big, big], INT64), g.constant(b.prefix, [3], [2, 3, 4], INT64), g.constant(b.prefix, [3], [s, s, s], INT64)],
          `${b.prefix}.shortcut/subsample`,
        );
      }
      const extra = b.outChannels - b.inChannels;
      residual = extra === 0 ? sub : g.node('Pad', [sub, g.constant(b.prefix, [10], [0, 0, 0, 0, 0, 0, extra, 0, 0, 0], INT64)], `${b.prefix}.shortcut/zeros`, []);
    }
    y = relu(g.node('Add', [out, residual], `${b.prefix}/add`), b.prefix);
    channelsOf.set(y, b.outChannels);
    if (b.stage === 'layer1') layer1 = y;
  }

  let output = y;
  let outName = 'features';
  const h = cfg.head;
  if (opts.withHead) {
    outName = 'logits';
    if (h.kind === 'segmentation') {
      let z = norm(convTranspose(y, 'head.conv_seg.0'), 'head.conv_seg.1', true);
      z = norm(conv(z, 'head.conv_seg.3', { pad: 1 }), 'head.conv_seg.4', true);
      output = conv(z, 'head.conv_seg.6');
    } else if (h.kind === 'unet') {
      const d = 'head.dec';
      let z = concat(convTranspose(y, `${d}.up3`), layer1, `${d}/cat3`);
      z = norm(conv(z, `${d}.conv3`, { pad: 1 }), `${d}.norm3`, true);
      z = concat(convTranspose(z, `${d}.up2`), stem, `${d}/cat2`);
      z = norm(conv(z, `${d}.conv2`, { pad: 1 }), `${d}.norm2`, true);
      const full = norm(conv(input, `${d}.in_conv`, { pad: 1 }), `${d}.in_norm`, true);
      z = concat(convTranspose(z, `${d}.up1`), full, `${d}/cat1`);
      z = norm(conv(z, `${d}.conv1`), `${d}.norm1`, true);
      output = conv(z, `${d}.cls`);
    } else {
      const pooled = g.node('Flatten', [g.node('GlobalAveragePool', [y], 'head/pool')], 'head/flatten', [int('axis', 1)]);
      output = g.node('Gemm', [pooled, w('head.fc.weight'), w('head.fc.bias')], 'head.fc', [int('transB', 1)]);
    }
  }
  // The last node writes the graph output under its public name.
  const last = g.nodes[g.nodes.length - 1];
  if (last.output[0] !== output) throw new Error('onnx export: internal: the output is not the last node');
  last.output = [outName];

  const dim = (v: number | string) => (typeof v === 'number' ? { dim_value: v } : { dim_param: v });
  const tensorType = (shape: (number | string)[]) => ({ tensor_type: { elem_type: FLOAT, shape: { dim: shape.map(dim) } } });
  const outShape: (number | string)[] = !opts.withHead
    ? ['N', cfg.featureChannels, 'D_out', 'H_out', 'W_out']
    : h.kind === 'classification'
      ? ['N', h.numClasses]
      : ['N', h.numClasses, 'D_out', 'H_out', 'W_out'];
  const model = {
    ir_version: ONNX_IR_VERSION,
    producer_name: 'medfl',
    producer_version: opts.producerVersion ?? '',
    model_version: 1,
    doc_string: opts.docString ?? '',
    opset_import: [{ domain: '', version: ONNX_OPSET }],
    graph: {
      name: 'med3d',
      node: g.nodes,
      initializer: g.initializers,
      input: [{ name: input, type: tensorType(['N', cfg.inChannels, 'D', 'H', 'W']) }],
      output: [{ name: outName, type: tensorType(outShape) }],
    },
  };
  const type = onnxModelType();
  const problem = type.verify(model);
  if (problem) throw new Error(`onnx export: internal: ${problem}`);
  return type.encode(type.fromObject(model)).finish();
}

/**
 * The trainer seam. A model architecture describes its parameters (with the groups plans select by);
 * a Trainer runs local training and evaluation on a compute engine. The small demo net and the
 * Med3D encoder both plug in here, so the coordinator and site agent never see layer code.
 */
import type { TensorBundle, TensorSpec } from '../tensors/bundle.ts';
import type { OptimizerSpec, OptimizerState } from './optim.ts';
import type { Rng } from '../util/random.ts';
import type { RestorationTransforms } from './genesis-corruption.ts';
import type { TrainObjective } from './restoration.ts';

/** Which side owns a parameter by default: the shared encoder, or the site's own head. */
export type ModelPart = 'encoder' | 'head';
/** Layer type, so plans can say "keep BatchNorm local" without string tricks on names. */
export type LayerType = 'conv' | 'norm' | 'dense' | 'other';

export interface ParamInfo extends TensorSpec {
  readonly part: ModelPart;
  readonly layerType: LayerType;
  /** Stage within the part, e.g. "stem", "stage1", "decoder". */
  readonly stage: string;
  /** False for statistics (BatchNorm running mean/var) that are updated but not trained by gradients. */
  readonly trainable: boolean;
}

export interface ModelArchitecture {
  /** Stable identifier written into plans and model files, e.g. "tiny3d". */
  readonly id: string;
  /** Number of output classes of the segmentation head (background included). */
  readonly numClasses: number;
  /** Input patch size [D, H, W] the architecture is built for. */
  readonly patchShape: readonly [number, number, number];
  params(): readonly ParamInfo[];
  /** Fresh weights for every parameter (encoder and head), deterministic in `seed`. */
  init(seed: number): TensorBundle;
}

/** One preprocessed case, in memory at the site only. Never serialised to the wire. */
export interface VolumeCase {
  /** Opaque per-site index such as "case-3"; never a path. */
  readonly id: string;
  readonly shape: readonly [number, number, number];
  /**
   * Normalised intensities, D*H*W*C channels last (index = ((z*H + y)*W + x)*C + c; with one channel simply
   * (z*H + y)*W + x), the NDHWC layout the encoders read.
   */
  readonly image: Float32Array;
  /** Input channels C (modalities); absent = 1. */
  readonly channels?: number;
  /** Class index per voxel, same layout as image; undefined for unlabelled cases. */
  readonly label?: Uint8Array;
  /** Case-level class for classification heads. */
  readonly classLabel?: number;
  /**
   * Soft per-voxel targets [D·H·W, numClasses] (rows sum to 1), e.g. a teacher's pseudo-labels; used instead
   * of `label` when present. Site-local like everything here.
   */
  readonly target?: Float32Array;
  /** Per-voxel loss weight, D·H·W (0 = masked out, e.g. an uncertain pseudo-label); absent = 1 everywhere. */
  readonly weight?: Float32Array;
}

/**
 * Training patches drawn on demand, so a site never holds all its volumes: the site's data loader reads,
 * preprocesses, caches (within a byte budget) and augments; the trainer only asks for a batch.
 */
export interface PatchSource {
  /** Number of distinct training cases behind the source (the update's sample count). */
  readonly cases: number;
  /** `count` patches of the architecture's patch shape, already augmented. */
  sample(count: number, rng: Rng): Promise<readonly VolumeCase[]>;
}

export interface TrainRequest {
  /** Start weights: the global shared tensors merged with the site's own local tensors. */
  readonly weights: TensorBundle;
  /** In-memory cases to sample random patches from; ignored when `source` is given. */
  readonly cases: readonly VolumeCase[];
  /** Patches on demand (the site's bounded-memory loader); takes precedence over `cases`. */
  readonly source?: PatchSource;
  readonly steps: number;
  readonly batchSize: number;
  readonly learningRate: number;
  readonly seed: number;
  /** FedProx proximal coefficient μ (0 = plain local SGD). */
  readonly proximalMu?: number;
  /** Optimiser, per-group learning-rate scales and frozen groups (default: Adam, everything trained). */
  readonly optimizer?: OptimizerSpec;
  /**
   * Optimiser state to start from, by parameter name (a site's own parameters, as its last round left them);
   * parameters without an entry start fresh. Must fit `optimizer` (kind, sizes).
   */
  readonly optimizerState?: OptimizerState;
  /** Multiplies the learning rate at each step (0-based step of this call): a learning-rate schedule. Absent = 1. */
  readonly learningRateFactor?: (step: number) => number;
  /** Called after each step; lets the agent heartbeat progress and draw bars. */
  readonly onStep?: (step: number, loss: number) => void;
  /**
   * Model noise of a noisy student: dropout probability on the features before the segmentation output
   * (tiny3d: the fused decoder features; Med3D: the encoder output) and on the classification head. 0/absent = none.
   */
  readonly dropout?: number;
  /**
   * segment (default): learn the labels (segmentation or classification head). restore: self-supervised
   * restoration pretraining — labels are never read; every case's patch is corrupted (`restoration`) and the
   * one-channel decoder (restoration.ts) learns to give the original back under a mean squared error.
   */
  readonly objective?: TrainObjective;
  /** The corruptions of the restore objective, with their probabilities (default: Models Genesis-like). */
  readonly restoration?: RestorationTransforms;
}

export interface TrainResult {
  /** All weights after training (shared and local); the agent picks what the plan shares. */
  readonly weights: TensorBundle;
  /** Mean loss over the last quarter of steps (less noisy than the last step). */
  readonly loss: number;
  readonly firstLoss: number;
  readonly samples: number;
  /** Final optimiser state of every parameter trained; the site keeps its own parameters' part and never sends it. */
  readonly optimizerState?: OptimizerState;
}

export interface EvalResult {
  /** Mean Dice per foreground class (index 0 is class 1), averaged over cases. */
  readonly dicePerClass: readonly number[];
  readonly meanDice: number;
  /** Classification heads: fraction of cases whose argmax class is right (Dice fields are then empty/NaN). */
  readonly accuracy?: number;
  readonly cases: number;
}

export interface Trainer {
  /** The compute engine actually running, e.g. "tfjs-node-gpu", "tfjs-node", "cpu". */
  readonly engine: string;
  readonly architecture: ModelArchitecture;
  train(req: TrainRequest): Promise<TrainResult>;
  evaluate(weights: TensorBundle, cases: readonly VolumeCase[]): Promise<EvalResult>;
  /**
   * Eval-mode (un-noised) class probabilities of a whole volume, [D·H·W, numClasses] (softmax, rows sum to 1).
   * Segmentation heads only; a teacher labels unlabelled cases with it.
   */
  predictProbs(weights: TensorBundle, vc: VolumeCase): Promise<Float32Array>;
}

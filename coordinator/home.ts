/**
 * The coordinator's directory: identity, PKI, signing key, plan and state, all in one place an admin can back up.
 *   coordinator.json   federation id, hosts, port; optional `transfers` limits (server/transfer-admission.ts) and
 *                      `receiveWindow` (server/receive-window.ts)
 *   pki/               ca.pem, ca.key (0600; read only by the coordinator, to sign site TLS client certificates at
 *                      enrolment), server.pem, server.key (0600), server-chain.pem
 *   keys/              coordinator.key (0600, Ed25519: signs task manifests)
 *   plan.yaml          the default plan, editable
 *   state.db           SQLite: sites, rounds, updates, models, metrics
 *   models/            global model versions, <sha256>.safetensors
 *   updates/           accepted updates per round; .partial/ holds uploads in flight
 */
import { existsSync, mkdirSync, readFileSync, chmodSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { z } from 'zod';
import { createCertificateAuthority, issueServerCertificate, certificateFingerprint, DEFAULT_SERVER_HOSTS, type CertificateAuthority, type ServerCertificate } from '../shared/security/pki.ts';
import { generateCoordinatorKey, toPrivateKey } from '../shared/security/site-identity.ts';
import { writeFileAtomic } from '../shared/util/fs-atomic.ts';
import type { KeyObject } from 'node:crypto';
import { TransferLimitsConfigSchema } from './server/transfer-admission.ts';
import { ReceiveWindowSchema } from './server/receive-window.ts';

export const DEFAULT_PORT = 7443;

const ConfigSchema = z.object({
  federationId: z.string().min(1),
  createdAt: z.string(),
  hosts: z.array(z.string()).min(1),
  port: z.number().int().min(0).max(65535),
  /** Bulk transfers at once (coordinator/server/transfer-admission.ts); each limit left out is derived from memory. */
  transfers: TransferLimitsConfigSchema.strict().optional(),
  /** HTTP/2 receive window per site connection, bytes or "grpc-default" (coordinator/server/receive-window.ts); default 32 MiB. */
  receiveWindow: ReceiveWindowSchema.optional(),
  // Strict: a misspelt setting ("recieveWindow") must stop the start, not be ignored while the operator believes it set.
}).strict();
export type CoordinatorConfig = z.infer<typeof ConfigSchema>;

export const DEFAULT_PLAN_YAML = `# MedFL federation plan. Every key is optional; these are the defaults.
name: medfl-federation
model:
  architecture: tiny3d      # or med3d: MedicalNet's 3D ResNet encoder + a head per site
  patch: [24, 24, 24]       # D, H, W voxels after preprocessing (med3d segmentation: multiples of 8)
  numClasses: 2
  width: 8                  # tiny3d base channels
  # med3d only: depth: 10 | 18 | 34 | 50 | 101, shortcut: A | B, widthMultiplier: 0.25 (1 = MedicalNet),
  #             head: segmentation | unet | classification, headChannels: N, dropout: 0.0,
  #             norm: batch | group | instance, normGroups: 8   (see docs/experiment.md for a recommended Med3D plan)
  #             inference: { mode: window, overlap: 0.5, blend: gaussian, flipTTA: false }   (default: whole volumes; docs/plan.md)
  seed: 1
  init: scratch             # or pretrained | partial:2 | mean-var (need pretrained: FILE) | inflate-2d:i3d (needs source2d: FILE)
rounds: 3
minSites: 2                 # quorum: a round closes at its deadline only with this many updates
sitesPerRound: 0            # 0 = every connected site
roundDeadlineSeconds: 300
waitForSitesSeconds: 600
gatherSeconds: 5            # with a quorum connected, wait this long for the other enrolled sites
local:
  steps: 12                 # or epochs: N (not both)
  batchSize: 2
  learningRate: 0.003
  proximalMu: 0             # FedProx μ; 0 = plain FedAvg
  # schedule: { type: cosine, warmupSteps: 50, minFactor: 0.05 }   # over all rounds × steps; default constant
  # optimizer: { kind: sgd, momentum: 0.9, weightDecay: 0.001,
  #              groups: [{ select: { part: head }, lrScale: 100 }, { select: { stage: [stem, layer1] }, freeze: true }] }
share:
  parts: [encoder]          # heads stay at the sites
  # keepLocal: [norm]       # layer types kept at each site; default [norm] (FedBN) for a med3d BatchNorm encoder, else []
aggregation:
  strategy: fedavg
retention:
  updateRounds: all         # or N: keep only the last N closed rounds' update files (model size x sites each)
`;

export class CoordinatorHome {
  constructor(readonly dir: string) {}

  get configPath(): string { return join(this.dir, 'coordinator.json'); }
  get planPath(): string { return join(this.dir, 'plan.yaml'); }
  get dbPath(): string { return join(this.dir, 'state.db'); }
  get modelsDir(): string { return join(this.dir, 'models'); }
  get updatesDir(): string { return join(this.dir, 'updates'); }
  get caCertPath(): string { return join(this.dir, 'pki', 'ca.pem'); }
  get caKeyPath(): string { return join(this.dir, 'pki', 'ca.key'); }

  exists(): boolean {
    return existsSync(this.configPath);
  }

  config(): CoordinatorConfig {
    if (!this.exists()) throw new Error(`${this.dir} is not a coordinator directory: run \`medfl coordinator init --dir ${this.dir}\` first`);
    let raw: unknown;
    try {
      raw = JSON.parse(readFileSync(this.configPath, 'utf8'));
    } catch (e) {
      throw new Error(`${this.configPath} is not valid JSON: ${(e as Error).message}`);
    }
    const parsed = ConfigSchema.safeParse(raw);
    if (!parsed.success) {
      const problems = parsed.error.issues.map((i) => `${i.path.join('.') || '(top level)'}: ${i.message}`).join('; ');
      throw new Error(`${this.configPath} is not a valid coordinator configuration: ${problems}`);
    }
    return parsed.data;
  }

  serverCertificate(): ServerCertificate {
    const pki = join(this.dir, 'pki');
    return {
      certPem: readFileSync(join(pki, 'server.pem'), 'utf8'),
      keyPem: readFileSync(join(pki, 'server.key'), 'utf8'),
      chainPem: readFileSync(join(pki, 'server-chain.pem'), 'utf8'),
    };
  }

  caPem(): string {
    return readFileSync(this.caCertPath, 'utf8');
  }

  /**
   * The CA with its private key, for issuing site client certificates; undefined when pki/ca.key is absent
   * (an admin may keep the CA key offline: sites then enrol without a client certificate, and --mtls cannot enrol).
   */
  certificateAuthority(): CertificateAuthority | undefined {
    if (!existsSync(this.caKeyPath)) return undefined;
    return { certPem: this.caPem(), keyPem: readFileSync(this.caKeyPath, 'utf8') };
  }

  caFingerprint(): string {
    return certificateFingerprint(this.caPem());
  }

  signingKey(): KeyObject {
    return toPrivateKey(readFileSync(join(this.dir, 'keys', 'coordinator.key'), 'utf8'));
  }

  /** Creates the directory: federation id, CA, server certificate, signing key, default plan. */
  static async init(dir: string, opts: { hosts?: string[]; port?: number; force?: boolean } = {}): Promise<CoordinatorHome> {
    const home = new CoordinatorHome(dir);
    if (home.exists() && !opts.force) {
      throw new Error(`${dir} already holds a coordinator (coordinator.json); refusing to overwrite its keys. Use another --dir.`);
    }
    mkdirSync(join(dir, 'pki'), { recursive: true, mode: 0o700 });
    mkdirSync(join(dir, 'keys'), { recursive: true, mode: 0o700 });
    const hosts = opts.hosts && opts.hosts.length > 0 ? opts.hosts : DEFAULT_SERVER_HOSTS;
    const federationId = `fed-${randomBytes(8).toString('hex')}`;
    const ca = await createCertificateAuthority({ commonName: `MedFL CA ${federationId}`, validDays: 3650 });
    const server = await issueServerCertificate(ca, { hosts, validDays: 825 });
    writeSecret(join(dir, 'pki', 'ca.key'), ca.keyPem);
    writeFileAtomic(join(dir, 'pki', 'ca.pem'), ca.certPem);
    writeSecret(join(dir, 'pki', 'server.key'), server.keyPem);
    writeFileAtomic(join(dir, 'pki', 'server.pem'), server.certPem);
    writeFileAtomic(join(dir, 'pki', 'server-chain.pem'), server.chainPem);
    const signing = generateCoordinatorKey();
    writeSecret(join(dir, 'keys', 'coordinator.key'), signing.privateKeyPem);
    writeFileAtomic(join(dir, 'keys', 'coordinator.pub'), signing.publicKeyRaw.toString('base64') + '\n');
    if (!existsSync(home.planPath) || opts.force) writeFileSync(home.planPath, DEFAULT_PLAN_YAML);
    const config: CoordinatorConfig = { federationId, createdAt: new Date().toISOString(), hosts, port: opts.port ?? DEFAULT_PORT };
    writeFileAtomic(home.configPath, JSON.stringify(config, null, 2) + '\n');
    return home;
  }
}

function writeSecret(path: string, pem: string): void {
  writeFileAtomic(path, pem, 0o600);
  chmodSync(path, 0o600);
}

/**
 * Wires a coordinator together: store, model files, round engine, event bus, and the gRPC server
 * (TLS on, token interceptor on every call but Enroll).
 *
 * mTLS (`requireClientCert`, CLI --mtls) on one port: TLS asks every client for a certificate from the federation
 * CA but does not reject a handshake without one, because a site enrols (and gets its certificate) over this
 * same port before it has one. The auth interceptor then requires a valid client certificate naming the calling
 * site on every method except Enroll.
 */
import * as grpc from '@grpc/grpc-js';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { CoordinatorHome } from './home.ts';
import type { CoordinatorStore } from './store/store.ts';
import { openStoreWhenPossible, retryUntilStarted } from './store/startup.ts';
import { ModelFiles } from './models/model-store.ts';
import { initialWeights } from './models/initial-model.ts';
import { RoundEngine } from './rounds/round-engine.ts';
import { keyTaskSigner, type TaskSigner } from './rounds/task-signer.ts';
import { SecureAggregation } from './rounds/features/secure-aggregation.ts';
import { strategyFromPlan } from './aggregation/index.ts';
import { federationHandlers } from './server/federation-service.ts';
import { ModelBytesCache } from './models/model-bytes-cache.ts';
import { TransferAdmission, defaultTransferLimits, resolveTransferLimits, type TransferLimitsConfig } from './server/transfer-admission.ts';
import { enrollmentHandlers } from './server/enrollment-service.ts';
import { applyReceiveWindow, DEFAULT_RECEIVE_WINDOW, receiveWindowBytes, receiveWindowServerOptions } from './server/receive-window.ts';
import { governanceHandlers } from './server/ledger-service.ts';
import { openLedger, strategyName } from './ledger/index.ts';
import { loadGovernanceService } from '../shared/privacy/governance-proto.ts';
import { UploadReceiver } from './server/upload-receiver.ts';
import { secAggHandlers } from './secagg/service.ts';
import { loadSecAggService } from '../shared/privacy/secagg/wire.ts';
import { createAuthInterceptor, type SiteDirectory } from './auth/interceptor.ts';
import { FailureLimiter, type FailureLimitOptions } from './auth/failure-limiter.ts';
import { NatsBus } from './events/nats-bus.ts';
import { Outbox } from './events/outbox.ts';
import type { EventBus } from '../shared/events/bus.ts';
import { loadPlanFile, defaultPlan } from '../shared/plan/load.ts';
import type { Plan } from '../shared/plan/schema.ts';
import { architectureFor } from '../shared/model/registry.ts';
import { loadProto } from '../shared/protocol/grpc.ts';
import { COORDINATOR_FEATURES, FEATURES, type Feature } from '../shared/protocol/features.ts';
import { serverCredentials } from '../shared/security/pki.ts';
import { rawPublicKey } from '../shared/security/site-identity.ts';
import { createLogger, type Logger } from '../shared/util/log.ts';
import { safetensorsLayout } from '../shared/tensors/safetensors.ts';
import { parseAdminHttpOptions, type AdminHttpSettings } from './admin-http/options.ts';
import { CoordinatorMetrics } from './admin-http/metrics.ts';
import { feedMetricsFromEvents } from './admin-http/event-metrics.ts';
import { readinessChecks } from './admin-http/readiness.ts';
import { RefusalWarnings } from './events/refusal-warnings.ts';
import { startAdminHttp, type AdminHttpServer } from './admin-http/server.ts';
import { createDashboardSource } from './admin-http/dashboard-data.ts';
import { recordPrivacyBudget } from './rounds/privacy-budget.ts';
import { describeStorageFault } from '../shared/util/storage-fault.ts';

export interface CoordinatorOptions {
  dir: string;
  planPath?: string;
  natsUrl?: string;
  port?: number;
  host?: string;
  /**
   * Require client certificates signed by the federation CA (mTLS) in addition to tokens, on every call but
   * Enroll. Sites get theirs at enrolment (always, with or without this option).
   */
  requireClientCert?: boolean;
  /**
   * Optional protocol features offered to sites (shared/protocol/features.ts); default: all this version has.
   * A feature left out is refused like a coordinator without it would (tests use this to play an older one).
   */
  features?: readonly Feature[];
  /** Resource limits (docs/security.md); each defaults as documented there. */
  limits?: {
    /** Uploads one site may have open at once (default 2). */
    maxOpenUploadsPerSite?: number;
    /** Per-peer limit on failed authentication and enrolment calls. */
    authFailures?: Partial<FailureLimitOptions>;
    /** Window in which repeated refused uploads of one site and reason make one warn line plus a count (default 60 s). */
    refusalWindowMs?: number;
    /**
     * Bulk transfers at once (server/transfer-admission.ts); overrides coordinator.json's `transfers`, whose limits
     * left out are derived from the machine's memory and the model's size.
     */
    transfers?: TransferLimitsConfig;
  };
  /** The coordinator's keepalive pings on each site connection (default SERVER_KEEPALIVE: every 60 s, 120 s to answer). */
  keepalive?: { timeMs?: number; timeoutMs?: number };
  /** Least time between two offers of a round's task to a selected site that heartbeats idle without it (default 30 s). */
  reofferMs?: number;
  /** The admin HTTP endpoint (/metrics, /healthz, /readyz, the dashboard; admin-http/): off unless given. */
  admin?: AdminHttpSettings;
  /**
   * Signs each task sent to sites (default: with the coordinator's Ed25519 key in `dir`). A seam for a signer that
   * records or vets what it signs, and for tests that play a coordinator holding the real key (rounds/task-signer.ts).
   */
  signTask?: TaskSigner;
  /** Opens the state database (default: the SQLite store in `dir`); a seam for tests that fill its disk. */
  openStore?: (path: string) => CoordinatorStore;
  /** How often opening the store, starting and the round engine's own work are retried while storage fails (default 10 s). */
  storageRetryMs?: number;
  log?: Logger;
}

export interface RunningCoordinator {
  port: number;
  federationId: string;
  engine: RoundEngine;
  bus: EventBus;
  store: CoordinatorStore;
  plan: Plan;
  /** The admin endpoint, when started with `admin`. */
  admin: AdminHttpServer | undefined;
  /** The gates bulk transfers pass (their limits and counts). */
  transfers: TransferAdmission;
  stop(): Promise<void>;
}

export async function startCoordinator(o: CoordinatorOptions): Promise<RunningCoordinator> {
  const home = new CoordinatorHome(o.dir);
  const config = home.config();
  // Checked before anything starts: a refused admin setting must not leave a half-started coordinator.
  const adminOptions = o.admin ? parseAdminHttpOptions(o.admin) : undefined;
  const log = o.log ?? createLogger('coordinator', { federation: config.federationId });
  const planPath = o.planPath ?? home.planPath;
  const plan = existsSync(planPath) ? loadPlanFile(planPath) : defaultPlan();
  const architecture = architectureFor(plan.model);
  // The largest transfer either way is the model file (every parameter as float32; an update holds a subset), with
  // header slack. Checked before anything starts: a bad limit must not leave a half-started coordinator.
  const modelLayout = safetensorsLayout(architecture.params());
  const transferBytes = 8 + modelLayout.header.length + modelLayout.dataBytes + 64 * 1024;
  // coordinator.json's `receiveWindow`: upload speed over long links against memory per connection (server/receive-window.ts).
  const receiveWindow = config.receiveWindow ?? DEFAULT_RECEIVE_WINDOW;
  const transferLimits = resolveTransferLimits(
    defaultTransferLimits({ transferBytes, windowBytes: receiveWindowBytes(receiveWindow) }),
    config.transfers,
    o.limits?.transfers,
  );
  // A full disk at start must not end the process: opening waits for space (store/startup.ts).
  const store = await openStoreWhenPossible(home.dbPath, { log, open: o.openStore, retryMs: o.storageRetryMs });
  const models = new ModelFiles(home.modelsDir);
  try {
    // For `medfl status`, which reads no plan: the budget the rounds are held to.
    recordPrivacyBudget(store, plan);
  } catch (e) {
    log.warn({ err: describeStorageFault(e) }, 'could not record the plan\'s privacy budget for medfl status (the rounds are still held to it)');
  }
  const remote = o.natsUrl ? await NatsBus.connect(o.natsUrl, { log }) : undefined;
  const signingKey = home.signingKey();
  // The signed, hash-chained contribution ledger (coordinator/ledger/), fed from the store's outbox like the events:
  // each entry and event is committed with the state change it records and published from there (events/outbox.ts).
  const ledger = await openLedger({ dir: o.dir, natsUrl: o.natsUrl, federation: config.federationId, signingKey, log });
  const bus = new Outbox({ store, remote, ledger, strategy: strategyName(plan), log });

  // One collapser for every refused-upload warn line (the engine's refusals and the upload handler's own).
  const refusals = new RefusalWarnings(log, { windowMs: o.limits?.refusalWindowMs });
  const engine = new RoundEngine({
    refusals,
    store,
    models,
    plan,
    architecture,
    // median / trimmed-mean spill each update here (one model per update, deleted at round close).
    strategy: strategyFromPlan(plan, { spillDir: `${home.updatesDir}/.spill` }),
    bus,
    federationId: config.federationId,
    signTask: o.signTask ?? keyTaskSigner(signingKey),
    log,
    initialWeights: () => initialWeights(architecture, plan, existsSync(planPath) ? planPath : undefined, log),
    maskedDir: `${home.updatesDir}/secagg`,
    updatesDir: home.updatesDir,
    // The plan's pretraining stage leaves its encoder file here, with its provenance (docs/pretraining.md).
    pretrainedDir: join(home.dir, 'pretrained'),
    storageRetryMs: o.storageRetryMs,
    reofferMs: o.reofferMs,
  });

  const transfers = new TransferAdmission(transferLimits, (direction, e) => log.error({ direction, err: (e as Error).message }, 'a transfer failed to start; its slot was given back'));
  log.info({ ...transferLimits, transferBytes }, 'bulk transfers at once: downloads and uploads beyond these wait their turn');

  // Metrics follow the event stream from before the first round opens (admin-http/event-metrics.ts).
  const metrics = adminOptions
    ? new CoordinatorMetrics({ federationId: config.federationId, store, engine, tracksPrivacy: plan.aggregation.dp !== undefined, dbPath: home.dbPath, partialDir: join(home.updatesDir, '.partial'), transfers })
    : undefined;
  if (metrics) feedMetricsFromEvents(bus, metrics, store);

  // The largest valid update is the shared tensors as safetensors; allow slack for header formatting.
  const sharedSpecs = engine.shared.map((p) => ({ name: p.name, shape: [...p.shape], dtype: p.dtype }));
  const layout = safetensorsLayout(sharedSpecs);
  const features = o.features ?? COORDINATOR_FEATURES;
  const receiver = new UploadReceiver(home.updatesDir, sharedSpecs, 8 + layout.header.length + layout.dataBytes + 64 * 1024, {
    sha256Trailer: features.includes(FEATURES.uploadSha256Trailer),
  });
  const cleaned = receiver.cleanPartials();
  if (cleaned > 0) log.info({ files: cleaned }, 'removed partial uploads left by an earlier run (never acknowledged)');
  // A coordinator killed while writing a model version (e.g. a round's aggregate before its close committed) left
  // the file half-written under a temporary name: never a version, and the close is redone from the stored updates.
  const halfWritten = models.cleanIncoming();
  if (halfWritten > 0) log.info({ files: halfWritten }, 'removed model files an earlier run left half-written');

  const directory: SiteDirectory = {
    getSite(name) {
      const s = store.siteCredentials(name);
      if (!s || !s.publicKey || s.state === 'invited') return undefined;
      return { publicKeyRaw: s.publicKey, revoked: s.state === 'revoked' };
    },
    consumeJti: (jti, exp) => store.consumeJti(jti, exp),
  };

  const mtls = o.requireClientCert ?? false;
  const caPem = home.caPem();
  // The CA key signs site client certificates at enrolment; without it sites enrol with no certificate.
  const ca = home.certificateAuthority();
  if (!ca) log.warn({ path: home.caKeyPath }, 'no CA key: sites will enrol without a TLS client certificate' + (mtls ? ', so none can enrol under --mtls' : ''));

  const { Enrollment, Federation } = loadProto();
  // One limiter for every way in (interceptor, enrolment): a peer's failures count together.
  const limiter = new FailureLimiter(log, o.limits?.authFailures);
  const authOptions = { federationId: config.federationId, directory, log, clientCaPem: mtls ? caPem : undefined, limiter, onFailure: metrics?.authFailed };
  const keepalive = {
    ...(o.keepalive?.timeMs !== undefined ? { 'grpc.keepalive_time_ms': o.keepalive.timeMs } : {}),
    ...(o.keepalive?.timeoutMs !== undefined ? { 'grpc.keepalive_timeout_ms': o.keepalive.timeoutMs } : {}),
  };
  const server = new grpc.Server({ ...receiveWindowServerOptions(receiveWindow), ...keepalive, interceptors: [createAuthInterceptor(authOptions)] });
  const federation = federationHandlers({ store, models, engine, receiver, log, features, maxOpenUploadsPerSite: o.limits?.maxOpenUploadsPerSite, refusals, onTransfer: metrics?.transferred, admission: transfers, modelBytes: new ModelBytesCache() });
  server.addService(
    Enrollment.service,
    enrollmentHandlers({ store, federationId: config.federationId, coordinatorPublicKey: rawPublicKey(signingKey), bus, log, ca, requireClientCert: mtls, limiter }),
  );
  server.addService(Federation.service, federation);
  server.addService(loadGovernanceService().service, governanceHandlers({ ledger, bus, federationId: config.federationId, log, onDecline: (site, round) => void engine.siteDeclined(site, round).catch((e: Error) => log.error({ err: e.message, site, round }, 'closing the round after a decline failed')) }));
  // The open round's session lives in the secure-aggregation round feature.
  const secureAggregation = engine.feature(SecureAggregation);
  server.addService(loadSecAggService().service, secAggHandlers({ session: (round) => secureAggregation?.sessionFor(round), log }));

  const creds = serverCredentials(home.serverCertificate(), mtls ? { clientCaPem: caPem, requestClientCert: true } : {});
  const host = o.host ?? '0.0.0.0';
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync(`${host}:${o.port ?? config.port}`, creds, (err, p) => (err ? reject(new Error(`cannot listen on ${host}:${o.port ?? config.port}: ${err.message}`)) : resolve(p))),
  );
  applyReceiveWindow(server, receiveWindow, log);
  log.info(
    { port, plan: planPath, rounds: plan.rounds, minSites: plan.minSites, bus: bus.describe(), shared: engine.sharedNames.length, mtls, receiveWindow },
    mtls ? 'coordinator listening (TLS, token auth, client certificates required)' : 'coordinator listening (TLS, token auth)',
  );
  let admin: AdminHttpServer | undefined;
  let stopStartRetries: (() => void) | undefined;
  try {
    if (adminOptions && metrics) {
      const readiness = () => readinessChecks({ store, bus: remote ?? bus, dir: home.dir, minFreeBytes: adminOptions.minFreeBytes });
      const dashboard = createDashboardSource({ store, federationId: config.federationId, plan, engine, bus, ledger, coordinatorPublicKey: rawPublicKey(signingKey), dir: home.dir });
      admin = await startAdminHttp(adminOptions, { metrics, readiness, log, dashboard });
    }
    bus.start();
    stopStartRetries = await retryUntilStarted(() => engine.start(), { log, what: 'starting the round engine', retryMs: o.storageRetryMs });
  } catch (e) {
    await admin?.close();
    server.forceShutdown();
    await bus.close();
    await ledger.close();
    await remote?.close();
    store.close();
    throw e;
  }

  return {
    port,
    federationId: config.federationId,
    engine,
    bus,
    store,
    plan,
    admin,
    transfers,
    async stop() {
      try {
        await admin?.close();
        stopStartRetries?.();
        engine.stop();
        refusals.close();
        // Task streams never end on their own, so a graceful shutdown would wait forever; sites reconnect.
        server.forceShutdown();
        limiter.close();
        // Sends in flight finish first; whatever is left unpublished stays in the outbox for the next start.
        await bus.close();
        await ledger.close();
        await remote?.close();
      } finally {
        // Whatever failed above, the database is closed cleanly (its WAL checkpointed, no -shm left behind).
        store.close();
      }
    },
  };
}

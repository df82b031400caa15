/**
 * An in-process coordinator (real gRPC, TLS, tokens) and scripted sites that upload hand-made updates
 * instead of training, so aggregation can be tested end to end in seconds, across coordinator restarts.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomUUID } from 'node:crypto';
import { pino } from 'pino';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { addSite } from '../../coordinator/admin.ts';
import { startCoordinator, type CoordinatorOptions, type RunningCoordinator } from '../../coordinator/coordinator.ts';
import { enrollSite } from '../../site-agent/enroll.ts';
import { SiteHome } from '../../site-agent/home.ts';
import { FederationClient, type UploadAck, type WireTask } from '../../site-agent/transport/client.ts';
import { uploadOnce } from '../../site-agent/transport/upload.ts';
import { waitFor } from '../../cli/processes.ts';
import { decodeSafetensors } from '../../shared/tensors/safetensors.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';
import type { FederationEvent } from '../../shared/events/bus.ts';

export interface ScriptedSite {
  name: string;
  client: FederationClient;
  /** TRAIN tasks received, by round. */
  tasks: Map<number, WireTask>;
  close(): void;
}

export class InprocFederation {
  coord: RunningCoordinator | undefined;
  port = 0;
  readonly events: FederationEvent[] = [];
  readonly sites: ScriptedSite[] = [];

  private constructor(
    readonly work: string,
    readonly coordDir: string,
    /** Further coordinator options for every start (e.g. its admin endpoint). */
    private readonly options: Partial<CoordinatorOptions> = {},
  ) {}

  static async create(plan: string, siteNames: string[], options: Partial<CoordinatorOptions> = {}): Promise<InprocFederation> {
    const work = mkdtempSync(join(tmpdir(), 'medfl-agg-'));
    const f = new InprocFederation(work, join(work, 'coordinator'), options);
    const home = await CoordinatorHome.init(f.coordDir, { hosts: ['localhost', '127.0.0.1'] });
    writeFileSync(home.planPath, plan);
    await f.start();
    for (const s of siteNames) {
      const inv = addSite(f.coordDir, s, { ttlSeconds: 600 });
      await enrollSite({ coordinator: `localhost:${f.port}`, token: inv.token, caFingerprint: inv.caFingerprint, dir: join(work, s) });
    }
    return f;
  }

  async start(): Promise<RunningCoordinator> {
    this.coord = await startCoordinator({ ...this.options, dir: this.coordDir, port: this.port, host: '127.0.0.1', log: pino({ level: 'silent' }) });
    this.port = this.coord.port;
    this.coord.bus.subscribe((e) => this.events.push(e));
    return this.coord;
  }

  async stop(): Promise<void> {
    for (const s of this.sites.splice(0)) s.close();
    await this.coord?.stop();
    this.coord = undefined;
  }

  /** Stops everything and deletes the work folder (stop() keeps it, for a restart); call once a test is done. */
  async close(): Promise<void> {
    await this.stop();
    rmSync(this.work, { recursive: true, force: true });
  }

  /** Connects every enrolled site's task stream (again, after a restart). */
  connect(names: string[]): ScriptedSite[] {
    for (const name of names) {
      const client = new FederationClient(new SiteHome(join(this.work, name)));
      const stream = client.subscribeTasks([]);
      const tasks = new Map<number, WireTask>();
      stream.on('data', (t: WireTask) => {
        if (t.kind === 'TRAIN') tasks.set(t.round, t);
      });
      stream.on('error', () => undefined);
      this.sites.push({ name, client, tasks, close: () => { stream.cancel(); client.close(); } });
    }
    return this.sites;
  }

  async task(site: ScriptedSite, round: number): Promise<WireTask> {
    await waitFor(() => site.tasks.has(round), 20_000, `${site.name}'s task for round ${round}`);
    return site.tasks.get(round)!;
  }

  /** The shared weights of a model version, read from the coordinator's files. */
  model(hash: string): TensorBundle {
    return decodeSafetensors(readFileSync(join(this.coordDir, 'models', `${hash}.safetensors`))).bundle;
  }

  upload(site: ScriptedSite, task: WireTask, payload: Buffer, numSamples = 4): Promise<UploadAck> {
    return uploadOnce(site.client, { updateId: `t-${randomUUID()}`, taskId: task.taskId, round: task.round, baseModelHash: task.modelHash, numSamples, payload });
  }

  async closedRounds(n: number): Promise<void> {
    await waitFor(() => (this.coord?.store.closedRoundCount() ?? 0) >= n, 30_000, `${n} closed rounds`);
  }
}

/**
 * The one CLI: `medfl coordinator …`, `medfl site …`, `medfl status`, `medfl demo`.
 * Output here is for people (tables, progress); logs from library code go to stderr as JSON (pino).
 */
import { Command, Option } from 'commander';
import { CoordinatorHome, DEFAULT_PORT } from '../coordinator/home.ts';
import { addSite, revokeSite, withStore } from '../coordinator/admin.ts';
import { sitesTable, statusJson, statusReport, storageCondition } from './status.ts';
import { eventFacts, validationCases } from '../coordinator/admin-http/status-json.ts';
import { parsePlan } from '../shared/plan/load.ts';
import { readFileSync } from 'node:fs';
import { registerAuditCommands } from './audit.ts';
import { registerExperimentCommand } from './experiment.ts';
import { registerBenchmarkCommand } from './benchmark.ts';
import { registerRollbackCommand } from './rollback.ts';
import { MAX_PORT, integerOption, positiveNumberOption } from './options.ts';
import { adminSettings, ADMIN_TOKEN_ENV, type AdminCliOptions } from './admin-options.ts';
import { EXPORT_FORMATS, exportMetrics, type ExportFormat } from './export-metrics.ts';

/** The version operators quote in reports: package.json's, read at run time so it cannot drift. */
const { version } = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };

/** The MedicalNet depths `model import` and `model embed` know. */
const MED3D_ARCHS = ['resnet10', 'resnet18', 'resnet34', 'resnet50', 'resnet101'] as const;

const program = new Command();
program.name('medfl').description('MedFL: federated transfer learning for 3D medical imaging').version(version).showHelpAfterError();

const coordinator = program.command('coordinator').description('run and administer a coordinator');

coordinator
  .command('init')
  .description("create a coordinator directory: signing key, CA, server certificate, default plan")
  .requiredOption('--dir <dir>', 'coordinator directory')
  .option('--host <host...>', 'DNS names / IPs sites will dial (go into the server certificate)', ['localhost', '127.0.0.1', '::1'])
  .option('--port <port>', 'default listening port', integerOption('--port', 1, MAX_PORT), DEFAULT_PORT)
  .action(async (o: { dir: string; host: string[]; port: number }) => {
    const home = await CoordinatorHome.init(o.dir, { hosts: o.host, port: o.port });
    const c = home.config();
    process.stdout.write(
      [
        `coordinator created in ${o.dir}`,
        `  federation id   ${c.federationId}`,
        `  CA fingerprint  ${home.caFingerprint()}`,
        `  plan            ${home.planPath} (edit it, then \`medfl coordinator start --dir ${o.dir}\`)`,
        `  add a site      medfl coordinator site add NAME --dir ${o.dir}`,
        '',
      ].join('\n'),
    );
  });

coordinator
  .command('start')
  .description('start the coordinator (TLS + token auth) and run the plan')
  .requiredOption('--dir <dir>', 'coordinator directory')
  .option('--plan <file>', 'plan file (YAML or JSON); default: DIR/plan.yaml')
  .option('--nats <url>', 'publish events to this NATS server (JetStream stream when available)')
  .option('--port <port>', 'listening port, 0 = any free port (default from coordinator.json)', integerOption('--port', 0, MAX_PORT))
  .option('--bind <host>', 'address to listen on', '0.0.0.0')
  .option('--mtls', 'also require client certificates from the federation CA', false)
  .option('--max-uploads-per-site <n>', 'uploads one site may have open at once (default 2)', integerOption('--max-uploads-per-site', 1, 64))
  .option('--auth-failure-burst <n>', 'failed authentication/enrolment calls one address may make before it is refused (default 50)', integerOption('--auth-failure-burst', 1, 1_000_000))
  .option('--auth-failure-refill <n>', 'failed calls forgiven per minute once over that (default 30)', integerOption('--auth-failure-refill', 1, 1_000_000))
  .option('--admin-port <port>', 'serve /metrics, /healthz and /readyz over HTTP on this port (off without it)', integerOption('--admin-port', 0, MAX_PORT))
  .option('--admin-host <host>', `address of the admin endpoint; one other than loopback needs an admin token (${ADMIN_TOKEN_ENV} or --admin-token-file)`, '127.0.0.1')
  .option('--admin-token-file <file>', 'file holding the bearer token every admin request must then present')
  .option('--ready-min-free-mb <MiB>', '/readyz fails below this much free disk space on the coordinator directory', integerOption('--ready-min-free-mb', 0, 100_000_000), 1024)
  .action(async (o: { dir: string; plan?: string; nats?: string; port?: number; bind: string; mtls: boolean; maxUploadsPerSite?: number; authFailureBurst?: number; authFailureRefill?: number } & AdminCliOptions) => {
    // Before any transfer: the coordinator streams GBs of Buffers a round through a small heap (heap-growth.ts says why).
    const { growHeapForStreaming } = await import('../shared/util/heap-growth.ts');
    growHeapForStreaming();
    const { startCoordinator } = await import('../coordinator/coordinator.ts');
    const running = await startCoordinator({ dir: o.dir, planPath: o.plan, natsUrl: o.nats, port: o.port, host: o.bind, requireClientCert: o.mtls, limits: { maxOpenUploadsPerSite: o.maxUploadsPerSite, authFailures: { burst: o.authFailureBurst, refillPerMinute: o.authFailureRefill } }, admin: adminSettings(o) });
    process.stdout.write(`coordinator ${running.federationId} listening on port ${running.port} (events: ${running.bus.describe()})\n`);
    if (running.admin) process.stdout.write(`admin endpoint ${running.admin.url} (/metrics, /healthz, /readyz)\ndashboard ${running.admin.url}/\n`);
    let stopping = false;
    const shutdown = async (why: string) => {
      if (stopping) return;
      stopping = true;
      process.stdout.write(`\n${why}: stopping coordinator\n`);
      try {
        await running.stop();
      } catch (e) {
        process.stderr.write(`stopping the coordinator failed: ${(e as Error).message}\n`);
        process.exit(1);
      }
      process.exit(0);
    };
    process.once('SIGINT', () => void shutdown('SIGINT'));
    process.once('SIGTERM', () => void shutdown('SIGTERM'));
    // Plan afterLastRound: exit (default) ends the process with status 0 once every planned round has closed.
    const { followLastRound } = await import('./after-last-round.ts');
    followLastRound(running, { say: (line) => process.stdout.write(`${line}\n`), shutdown });
  });

const site = coordinator.command('site').description('add, revoke and list sites (no restart needed)');

site
  .command('add <name>')
  .description('invite a site: prints a one-time enrolment token and the CA fingerprint')
  .requiredOption('--dir <dir>', 'coordinator directory')
  // A year at most: an invitation is a bearer secret, not a standing credential.
  .option('--ttl <hours>', 'hours the token stays valid (fractions allowed)', positiveNumberOption('--ttl', 8760, 'hours'), 24)
  .action((name: string, o: { dir: string; ttl: number }) => {
    const inv = addSite(o.dir, name, { ttlSeconds: Math.max(1, Math.round(o.ttl * 3600)) });
    process.stdout.write(
      [
        `site '${inv.site}' invited to federation ${inv.federationId}`,
        `  token           ${inv.token}`,
        `  expires         ${inv.expiresAt.toISOString()} (one use)`,
        `  CA fingerprint  ${inv.caFingerprint}`,
        '',
        'At the site, run:',
        `  medfl site enroll --coordinator HOST:PORT --token ${inv.token} --ca-fingerprint ${inv.caFingerprint} --dir SITE_DIR`,
        '',
      ].join('\n'),
    );
  });

site
  .command('revoke <name>')
  .description('revoke a site: its tokens stop working at once')
  .requiredOption('--dir <dir>', 'coordinator directory')
  .action((name: string, o: { dir: string }) => {
    revokeSite(o.dir, name);
    process.stdout.write(`site '${name}' revoked\n`);
  });

site
  .command('list')
  .description('list sites')
  .requiredOption('--dir <dir>', 'coordinator directory')
  .action((o: { dir: string }) => {
    // As in `medfl status`: sites that ended with the federation read finished, a site without validation data says so.
    const text = withStore(new CoordinatorHome(o.dir), (s) => sitesTable(s.listSites(), Date.now(), { finish: eventFacts(s).finish, validation: validationCases(s) }));
    process.stdout.write(text + '\n');
  });

coordinator
  .command('check-plan <file>')
  .description('validate a plan file and print it with defaults filled in')
  .action((file: string) => {
    const plan = parsePlan(readFileSync(file, 'utf8'), file);
    process.stdout.write(JSON.stringify(plan, null, 2) + '\n');
  });

registerRollbackCommand(coordinator); // medfl coordinator rollback --dir DIR --to VERSION

coordinator
  .command('export-metrics')
  .description('every metric the sites reported, one row per round × site × metric (CSV or JSON), from the store')
  .requiredOption('--dir <dir>', 'coordinator directory')
  .addOption(new Option('--format <format>', 'output format').choices([...EXPORT_FORMATS]).default('csv'))
  .option('--out <file>', 'write to FILE instead of stdout')
  .action((o: { dir: string; format: ExportFormat; out?: string }) => {
    const home = new CoordinatorHome(o.dir);
    const c = home.config();
    const rows = withStore(home, (s) => s.listMetrics());
    process.stdout.write(exportMetrics(rows, { format: o.format, federationId: c.federationId, out: o.out }));
  });

const siteCmd = program.command('site').description('run a site agent inside a hospital');

siteCmd
  .command('enroll')
  .description("join a federation: pins the coordinator's CA, makes this site's own key pair, registers the public key")
  .requiredOption('--coordinator <host:port>', 'coordinator address')
  .requiredOption('--token <token>', 'one-time enrolment token from the coordinator admin')
  .requiredOption('--ca-fingerprint <fp>', 'SHA-256 fingerprint of the federation CA, from the coordinator admin')
  .requiredOption('--dir <dir>', 'site directory (keys, cache, local model parts)')
  .action(async (o: { coordinator: string; token: string; caFingerprint: string; dir: string }) => {
    const { enrollSite } = await import('../site-agent/enroll.ts');
    const c = await enrollSite({ coordinator: o.coordinator, token: o.token, caFingerprint: o.caFingerprint, dir: o.dir });
    process.stdout.write(`enrolled as '${c.siteName}' in federation ${c.federationId}; private key kept in ${o.dir}/site.key (mode 0600)\nnext: medfl site run --dir ${o.dir} --data DATA_DIR\n`);
  });

siteCmd
  .command('run')
  .description('connect out to the coordinator and train when asked')
  .requiredOption('--dir <dir>', 'site directory')
  .requiredOption('--data <dir>', 'local data in the MSD / nnU-Net layout (dataset.json, imagesTr/, labelsTr/)')
  .option('--audit-wire <file>', 'append a summary of every message this site sends to FILE')
  .option('--exit-when-finished', 'exit when the coordinator says the federation is finished', false)
  .addOption(new Option('--engine <name>', 'force the tfjs engine (tiny3d); env MEDFL_ENGINE').choices(['auto', 'tfjs-node-gpu', 'tfjs-node', 'wasm', 'cpu']))
  .addOption(new Option('--kernels <name>', 'force the convolution kernels of the Med3D engine; env MEDFL_KERNELS').choices(['auto', 'tfjs-node-gpu', 'onednn', 'tfjs-node', 'js']))
  .option('--metrics-port <port>', "serve this agent's Prometheus metrics on 127.0.0.1:PORT (/metrics, /healthz)", integerOption('--metrics-port', 0, MAX_PORT))
  .action(async (o: { dir: string; data: string; auditWire?: string; exitWhenFinished: boolean; engine?: string; kernels?: string; metricsPort?: number }) => {
    if (o.kernels) process.env.MEDFL_KERNELS = o.kernels;
    const { SiteAgent } = await import('../site-agent/agent.ts');
    const { createLogger } = await import('../shared/util/log.ts');
    const { SiteHome } = await import('../site-agent/home.ts');
    const siteConfig = new SiteHome(o.dir).config();
    const log = createLogger('site-agent', { site: siteConfig.siteName });
    // Said once at start: without validation cases the site reports no validation Dice all federation long.
    const { validationNotice } = await import('../site-agent/validation-notice.ts');
    await validationNotice(o.data).then(
      (n) => (n.warning ? log.warn({ validationCases: 0, trainingCases: n.trainingCases }, n.warning) : log.info({ validationCases: n.validationCases, trainingCases: n.trainingCases }, 'validation cases found')),
      (e: Error) => log.warn({ reason: e.message }, 'could not check the data folder for validation cases; training will report what is wrong with it'),
    );
    const { SiteMetrics } = await import('../site-agent/metrics.ts');
    const metrics = o.metricsPort === undefined ? undefined : new SiteMetrics({ site: siteConfig.siteName, federation: siteConfig.federationId });
    const agent = new SiteAgent({ dir: o.dir, dataDir: o.data, log, auditPath: o.auditWire, exitWhenFinished: o.exitWhenFinished, engine: o.engine, observer: metrics });
    metrics?.follow(() => agent.activity);
    const { startSiteMetricsHttp } = await import('../site-agent/metrics-http.ts');
    const endpoint = metrics ? await startSiteMetricsHttp(o.metricsPort!, metrics, log) : undefined;
    process.once('SIGINT', () => agent.stop());
    process.once('SIGTERM', () => agent.stop());
    await agent.run();
    await endpoint?.close();
    process.exit(0);
  });

siteCmd
  .command('evaluate')
  .description("score a global model version with this site's own head on a labelled folder (full resolution, Dice); nothing is sent")
  .requiredOption('--dir <dir>', 'site directory')
  .requiredOption('--data <dir>', "the site's data folder (its dataset.json gives labels and channels)")
  .requiredOption('--test <dir>', 'labelled folder to score: imagesTs/ + labelsTs/, or an MSD folder with labels')
  .requiredOption('--model <file>', 'global model version (.safetensors, e.g. from the coordinator\'s models/ folder)')
  .requiredOption('--plan <file>', "the federation's plan (decides the architecture and the site's local tensors)")
  .action(async (o: { dir: string; data: string; test: string; model: string; plan: string }) => {
    const { runSiteEvaluate } = await import('./site-evaluate.ts');
    const { loadPlanFile } = await import('../shared/plan/load.ts');
    const r = await runSiteEvaluate({ ...o, plan: loadPlanFile(o.plan) });
    process.stdout.write(`test Dice ${r.meanDice.toFixed(4)} (per class: ${r.dicePerClass.map((d) => d.toFixed(4)).join(', ')}) on ${r.cases} case(s)\n`);
  });

siteCmd
  .command('check-data <dir>')
  .description('validate a data folder (MSD / nnU-Net layout): table of cases and every problem; exit 1 if a case is unusable')
  .option('--channels <n>', "input channels the plan's model takes (model.inputChannels); another count in dataset.json is an error")
  .action(async (dir: string, o: { channels?: string }) => {
    const { runCheckData } = await import('./check-data.ts');
    const expectChannels = o.channels === undefined ? undefined : Number(o.channels);
    if (expectChannels !== undefined && !(Number.isInteger(expectChannels) && expectChannels >= 1)) {
      process.stderr.write(`error: --channels "${o.channels}": expected a positive integer\n`);
      process.exit(2);
    }
    process.exit(await runCheckData(dir, undefined, expectChannels === undefined ? {} : { expectChannels }));
  });

siteCmd
  .command('import-dicom')
  .description('convert DICOM series into a data folder (MSD layout, NIfTI): one case per series, DICOM-SEG objects as their series\' labels, no identifiers in names; reports what it skipped and why')
  .requiredOption('--in <dir>', 'folder of DICOM files (any structure)')
  .requiredOption('--out <dir>', 'new data folder to write (imagesTr/, dataset.json)')
  .option('--labels <dir>', 'segmentations as NIfTI named SERIES_INSTANCE_UID.nii(.gz), on their series grid (they win over a DICOM-SEG of the same series)')
  .option('--map <file>', 'also write case → SeriesInstanceUID/StudyInstanceUID as CSV (mode 0600; outside the data folder)')
  .option('--modality <code>', 'import only this DICOM modality (CT, MR, …); default the most common one')
  .action(async (o: { in: string; out: string; labels?: string; map?: string; modality?: string }) => {
    const { runImportDicom, formatImportReport } = await import('./import-dicom.ts');
    const { createLogger } = await import('../shared/util/log.ts');
    const r = await runImportDicom({ input: o.in, out: o.out, labels: o.labels, map: o.map, modality: o.modality }, createLogger('import-dicom'));
    process.stdout.write(formatImportReport(r));
    process.exit(r.cases.length > 0 ? 0 : 1);
  });

const model = program.command('model').description('import pretrained checkpoints, export to PyTorch and run the Med3D encoder');

model
  .command('import <checkpoint>')
  .description('read a MedicalNet checkpoint (.pth as published, or .safetensors) into a MedFL model file; fails with a list of every mismatched key')
  .addOption(new Option('--arch <arch>', 'MedicalNet ResNet depth').choices([...MED3D_ARCHS]).makeOptionMandatory())
  .addOption(new Option('--shortcut <type>', "shortcut type (default: MedicalNet's release choice for the depth)").choices(['A', 'B']))
  .option('--width <multiplier>', 'width multiplier of the checkpoint', positiveNumberOption('--width', 64), 1)
  .option('--classes <n>', 'segmentation classes of the head, when the head is imported', integerOption('--classes', 2, 1000), 2)
  .addOption(new Option('--parts <parts>', 'what to import').choices(['auto', 'encoder', 'all']).default('auto'))
  .option('--container <key>', 'dotted key of the weights inside the checkpoint (default: state_dict, model, net or the top level)')
  .requiredOption('--out <file>', 'output .safetensors')
  .action(async (checkpoint: string, o: { arch: string; shortcut?: string; width: number; classes: number; parts: 'auto' | 'encoder' | 'all'; container?: string; out: string }) => {
    const { runImport, formatImportResult } = await import('./model-import.ts');
    const r = await runImport({ checkpoint, arch: o.arch, shortcut: o.shortcut, widthMultiplier: o.width, numClasses: o.classes, parts: o.parts, container: o.container, out: o.out });
    process.stdout.write(formatImportResult(r) + '\n');
  });

model
  .command('export <model>')
  .description(
    "write a MedFL model as a PyTorch state_dict in MedicalNet's names and layouts (torch: torch.load; load_state_dict(strict=True) into MedicalNet's module) or as an ONNX graph (onnx: onnxruntime and other inference servers)",
  )
  .addOption(new Option('--format <format>', 'output format').choices(['torch', 'onnx']).makeOptionMandatory())
  .option('--head <file>', "the site's local tensors (SITE_DIR/local/med3d-….safetensors): export its own head with the encoder")
  .requiredOption('--out <file>', 'output .pth or .onnx')
  .action(async (modelFile: string, o: { format: string; head?: string; out: string }) => {
    const { runExport, formatExportResult } = await import('./model-export.ts');
    process.stdout.write(formatExportResult(await runExport({ model: modelFile, format: o.format, head: o.head, out: o.out })) + '\n');
  });

model
  .command('embed')
  .description('run the Med3D encoder (eval mode) on a volume and write layer4 features as .npy (N×D′×H′×W′×C)')
  .requiredOption('--model <file>', 'model .safetensors (MedFL or PyTorch layout)')
  .requiredOption('--input <volume...>', ".nii, .nii.gz or .npy (float32, D×H×W or N×D×H×W×C); a model with C input channels takes C NIfTI files, one per channel")
  .requiredOption('--out <file>', 'output .npy')
  .addOption(new Option('--arch <arch>', 'override the architecture recorded in the file').choices([...MED3D_ARCHS]))
  .addOption(new Option('--shortcut <type>', 'override the shortcut type').choices(['A', 'B']))
  .option('--width <multiplier>', 'override the width multiplier', positiveNumberOption('--width', 64))
  .addOption(new Option('--engine <name>', 'force a compute engine').choices(['auto', 'tfjs-node-gpu', 'tfjs-node', 'wasm', 'cpu']))
  .action(async (o: { model: string; input: string[]; out: string; arch?: string; shortcut?: string; width?: number; engine?: string }) => {
    const { runEmbed } = await import('./model-embed.ts');
    await runEmbed({ ...o, log: (line) => process.stdout.write(line + '\n') });
  });

program
  .command('status')
  .description('rounds, sites and the current model of a coordinator, as tables (or JSON)')
  .requiredOption('--dir <dir>', 'coordinator directory')
  .option('--json', 'print one JSON object instead of tables (for scripts and monitoring)', false)
  .action((o: { dir: string; json: boolean }) => {
    const home = new CoordinatorHome(o.dir);
    const c = home.config();
    const storage = storageCondition(home.dir);
    const text = withStore(home, (s) => (o.json ? JSON.stringify(statusJson(s, c.federationId, Date.now(), storage), null, 2) : statusReport(s, c.federationId, storage)));
    process.stdout.write(text + '\n');
  });

program
  .command('demo')
  .description('a local federation: one coordinator and three sites as separate processes, TLS and tokens on, generated phantoms')
  .option('--dir <dir>', 'work directory (default: a new temporary directory)')
  .option('--rounds <n>', 'rounds to run', integerOption('--rounds', 1, 1000), 5)
  // Sites are named site-a … site-z.
  .option('--sites <n>', 'number of sites', integerOption('--sites', 1, 26), 3)
  .option('--steps <n>', 'local steps per round', integerOption('--steps', 1, 100_000), 16)
  .option('--nats <url>', 'also publish events to this NATS server')
  .action(async (o: { dir?: string; rounds: number; sites: number; steps: number; nats?: string }) => {
    const { runDemo } = await import('./demo.ts');
    const ok = await runDemo({ dir: o.dir, rounds: o.rounds, sites: o.sites, steps: o.steps, natsUrl: o.nats });
    process.exit(ok ? 0 : 1);
  });

registerAuditCommands(program); // medfl audit verify, medfl site ledger
registerExperimentCommand(program); // medfl experiment (in-process comparison of training arms)
registerBenchmarkCommand(program); // medfl benchmark generate|baseline (synthetic brain-lesion benchmark)

program.parseAsync(process.argv).catch((e: unknown) => {
  const err = e as Error;
  // People get the cause and the fix, not a stack; MEDFL_DEBUG=1 shows the stack.
  process.stderr.write(`medfl: ${err.message}\n`);
  if (process.env.MEDFL_DEBUG) process.stderr.write(`${err.stack}\n`);
  process.exit(1);
});

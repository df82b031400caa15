/**
 * A site agent that leaves for good once its masked input of one round was taken, for the secure-aggregation
 * end-to-end test: `node --import tsx site-exits-after-masking.ts DIR DATA AUDIT_FILE ROUND`. Its observer ends
 * the process with code 3 at the agent's 'masked-sent' step, before the agent would send its unmask shares.
 */
import { SiteAgent } from '../../site-agent/agent.ts';
import { SiteHome } from '../../site-agent/home.ts';
import { createLogger } from '../../shared/util/log.ts';

const [dir, dataDir, auditPath, round] = process.argv.slice(2);
if (!dir || !dataDir || !auditPath || !round) throw new Error('usage: site-exits-after-masking.ts DIR DATA AUDIT_FILE ROUND');
const log = createLogger('site-agent', { site: new SiteHome(dir).config().siteName });
const agent = new SiteAgent({
  dir,
  dataDir,
  log,
  auditPath,
  exitWhenFinished: true,
  observer: {
    phase() {},
    task() {},
    transferred() {},
    secAggStep(step, r) {
      if (step !== 'masked-sent' || r !== Number(round)) return;
      log.warn({ round: r }, 'leaving after the masked input, before unmasking (test fault)');
      process.exit(3);
    },
  },
});
await agent.run();
process.exit(0);

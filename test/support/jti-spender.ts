/**
 * A coordinator store in a process of its own, for the replay-across-restart test: it spends the token ids named
 * on its command line (as the interceptor would, each call waiting for its id to be durable), notes the sites seen,
 * prints `durable N` once every id has been let through, and then waits to be killed (kill -9: nothing is flushed
 * on the way out).
 *
 *   node --import tsx test/support/jti-spender.ts STATE_DB EXPIRES_AT_SEC JTI...
 */
import { CoordinatorStore } from '../../coordinator/store/store.ts';

const [path, exp, ...ids] = process.argv.slice(2);
const store = new CoordinatorStore(path!);
const results = await Promise.all(ids.map((id) => store.consumeJti(id, Number(exp))));
store.touchSite('site-a', 'training', null);
process.stdout.write(`durable ${results.filter(Boolean).length}\n`);
setInterval(() => undefined, 60_000);

/**
 * `medfl coordinator rollback --dir DIR --to VERSION`: return the federation to an earlier global model version
 * (coordinator/rounds/rollback.ts). Works with the coordinator running or stopped; the coordinator announces it
 * (event `model.rolled_back`, a ledger entry) within seconds, or at its next start.
 */
import type { Command } from 'commander';
import { CoordinatorHome } from '../coordinator/home.ts';
import { withStore } from '../coordinator/admin.ts';
import { rollbackFederation, type RollbackRecord } from '../coordinator/rounds/rollback.ts';

export function runRollback(o: { dir: string; to: string; reason?: string }): RollbackRecord {
  const home = new CoordinatorHome(o.dir);
  home.config(); // a clear error for a directory that is not a coordinator's
  return withStore(home, (s) => rollbackFederation(s, { to: o.to, reason: o.reason }));
}

export function registerRollbackCommand(coordinator: Command): void {
  coordinator
    .command('rollback')
    .description('return the federation to an earlier model version (recorded in the ledger and the event stream)')
    .requiredOption('--dir <dir>', 'coordinator directory')
    .requiredOption('--to <version>', 'a round number (its result; 0 = the initial model) or a model hash (≥ 8 hex digits)')
    .option('--reason <text>', 'why, for the event stream and the audit trail')
    .action((o: { dir: string; to: string; reason?: string }) => {
      const r = runRollback(o);
      const failed = r.failedRound !== null ? `; open round ${r.failedRound} failed (its updates are not used)` : '';
      process.stdout.write(
        `rolled back to model ${r.toModel} (round ${r.toRound}) from ${r.fromModel.slice(0, 12)}…${failed}.\n` +
          'The coordinator announces it (event model.rolled_back, ledger entry) within seconds if running, else at its next start.\n' +
          'Closed rounds still count towards plan.rounds; the server optimiser restarts; privacy already spent stays spent.\n',
      );
    });
}

/**
 * What `medfl coordinator start` does once every planned round has closed (plan `afterLastRound`): `exit` stops the
 * coordinator and ends the process with status 0 after `finishGraceSeconds`; `idle` keeps it up and says so, once,
 * on stdout and in the log. Either way the round engine has already told the sites that the federation is finished.
 * A coordinator started on a federation that finished earlier does the same at once.
 */
import type { RunningCoordinator } from '../coordinator/coordinator.ts';

export interface AfterLastRoundHooks {
  /** A line for the operator (stdout). */
  say(line: string): void;
  /** Stops the coordinator and ends the process; `why` goes into the shutdown line. */
  shutdown(why: string): Promise<void>;
}

/** Follows the federation's end; returns a function that stops following (and cancels a pending exit). */
export function followLastRound(running: Pick<RunningCoordinator, 'engine' | 'bus' | 'plan' | 'store'>, hooks: AfterLastRoundHooks): () => void {
  const { plan } = running;
  let timer: NodeJS.Timeout | undefined;
  let handled = false;
  const onFinished = (why?: unknown) => {
    if (handled) return;
    handled = true;
    const rounds = running.store.closedRoundCount();
    // A federation can also end early: its privacy budget would not allow another round.
    const early = typeof why === 'string' && why !== 'all planned rounds closed' ? ` (${why})` : '';
    if (plan.afterLastRound === 'idle') {
      hooks.say(`federation finished: ${rounds} rounds closed${early}; the coordinator stays up, idle (plan afterLastRound: idle) — status, the dashboard and /metrics still answer; stop it with Ctrl-C or SIGTERM`);
      return;
    }
    hooks.say(`federation finished: ${rounds} rounds closed${early}; exiting in ${plan.finishGraceSeconds} s (plan afterLastRound: exit, finishGraceSeconds: ${plan.finishGraceSeconds})`);
    timer = setTimeout(() => void hooks.shutdown('federation finished'), plan.finishGraceSeconds * 1000);
  };
  const unsubscribe = running.bus.subscribe((e) => {
    if (e.type === 'federation.finished') onFinished(e.why);
  });
  // Finished before we listened: the engine decides that while it starts.
  if (running.engine.isFinished) onFinished();
  return () => {
    unsubscribe();
    if (timer) clearTimeout(timer);
  };
}

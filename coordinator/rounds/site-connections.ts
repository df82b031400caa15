/**
 * The sites connected to the coordinator's task stream: one stream per site (a newer one replaces an older one), and
 * what each announced when it subscribed.
 */
import { PROTOCOL_VERSION, SITE_FEATURES, type SiteCapabilities } from '../../shared/protocol/features.ts';
import type { TaskManifest } from '../../shared/protocol/task.ts';

/** The wire shape of a Task, as handed to a site's stream. */
export interface TaskMessage extends TaskManifest {
  signature: Buffer;
}

export interface TaskSink {
  send(task: TaskMessage): void;
  /** What the site announced when it subscribed; absent = a site of this very build (in-process callers). */
  readonly capabilities?: SiteCapabilities;
  /** Another stream of the same site took over: end this one, saying why. */
  replaced?(): void;
}

/** What a sink's site can do; a sink that announced nothing is a site of this very build. */
export function capabilitiesOf(sink: TaskSink): SiteCapabilities {
  return sink.capabilities ?? { protocolVersion: PROTOCOL_VERSION, features: new Set(SITE_FEATURES) };
}

export class SiteConnections {
  private readonly sinks = new Map<string, TaskSink>();

  /** Registers `sink` as `site`'s stream; true when the site was not connected before (it joined). */
  connect(site: string, sink: TaskSink): boolean {
    const previous = this.sinks.get(site);
    this.sinks.set(site, sink);
    if (!previous) return true;
    // One task stream per site: an older one is a dead connection or a second agent with the same key.
    if (previous !== sink) previous.replaced?.();
    return false;
  }

  /** Forgets `site` if `sink` is still its stream; true when it did (the site left). */
  disconnect(site: string, sink: TaskSink): boolean {
    if (this.sinks.get(site) !== sink) return false; // an older stream of a site that already reconnected
    this.sinks.delete(site);
    return true;
  }

  get(site: string): TaskSink | undefined {
    return this.sinks.get(site);
  }

  has(site: string): boolean {
    return this.sinks.has(site);
  }

  sites(): string[] {
    return [...this.sinks.keys()].sort();
  }

  all(): IterableIterator<TaskSink> {
    return this.sinks.values();
  }

  capabilities(): Map<string, SiteCapabilities> {
    return new Map([...this.sinks].map(([site, sink]) => [site, capabilitiesOf(sink)]));
  }
}

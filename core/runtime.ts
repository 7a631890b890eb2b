/**
 * The runtime every mode shares: the event bus, the shutdown signal, the
 * logger plugins (and the Logger that fans out to them), and the loading of
 * the plugins both modes use (transport, cipher, auth).
 *
 * Control-plane events are turned into log records here, so a logger plugin
 * sees sessions and streams come and go without subscribing to anything.
 */
import { setMaxListeners } from 'node:events';
import { EventBus } from './events.ts';
import { createLogger } from './log.ts';
import { loadPlugin } from './registry.ts';
import { decodeKey } from './keys.ts';
import { keyPairFromPrivate, type KeyPair } from './x25519.ts';
import type { HashName } from './noise.ts';
import type {
  AuthPlugin,
  CipherPlugin,
  Closable,
  Logger,
  LoggerPlugin,
  Mode,
  PluginInstanceMap,
  PluginKind,
  ResolvedConfig,
  ResolvedPluginRef,
  TransportPlugin,
} from './types.ts';

export interface Runtime {
  readonly config: ResolvedConfig;
  readonly events: EventBus;
  readonly log: Logger;
  readonly signal: AbortSignal;
  /** Load one plugin with a context for `mode`. */
  load<K extends PluginKind>(kind: K, ref: ResolvedPluginRef, mode: Mode): Promise<PluginInstanceMap[K]>;
  /** Abort the signal, close every loaded plugin (loggers last). Idempotent. */
  close(): Promise<void>;
}

export interface RuntimeOptions {
  /** Extra logger plugins (tests); they receive every record. */
  extraSinks?: LoggerPlugin[];
  /** The mode loggers are created for ('server' for local mode too). */
  mode: Mode;
}

export async function createRuntime(config: ResolvedConfig, opts: RuntimeOptions): Promise<Runtime> {
  const events = new EventBus();
  const controller = new AbortController();
  // Every plugin, outbound connect and dial in flight listens here for shutdown: a busy server
  // has hundreds at once by design, which Node would report as a leak after 10.
  setMaxListeners(0, controller.signal);
  const sinks: LoggerPlugin[] = [...(opts.extraSinks ?? [])];
  const log = createLogger(sinks, '');
  const loaded: { kind: PluginKind; instance: Closable }[] = [];

  const load = async <K extends PluginKind>(kind: K, ref: ResolvedPluginRef, mode: Mode): Promise<PluginInstanceMap[K]> => {
    const { instance } = await loadPlugin(kind, ref, {
      mode,
      events,
      signal: controller.signal,
      config,
      baseDir: config.baseDir,
      log,
    });
    loaded.push({ kind, instance: instance as Closable });
    return instance;
  };

  for (const ref of config.logging) sinks.push(await load('logger', ref, opts.mode));
  forwardEventsToLog(events, log);

  let closing: Promise<void> | undefined;
  const close = (): Promise<void> => {
    closing ??= (async () => {
      controller.abort();
      // Loggers last, so the others can still log while they close.
      const order = [...loaded].reverse().sort((a, b) => Number(a.kind === 'logger') - Number(b.kind === 'logger'));
      for (const { instance } of order) {
        try {
          await instance.close?.();
        } catch {
          // A plugin failing to close must not stop the others from closing.
        }
      }
    })();
    return closing;
  };

  return { config, events, log, signal: controller.signal, load, close };
}

/** The plugins both modes need, loaded and with their keys decoded. */
export interface CommonPlugins {
  transport: TransportPlugin;
  cipher: CipherPlugin;
  auth: AuthPlugin;
  hash: HashName;
}

export async function loadCommonPlugins(rt: Runtime, mode: Mode): Promise<CommonPlugins> {
  const { config } = rt;
  const transport = await rt.load('transport', config.transport, mode);
  const cipher = await rt.load('cipher', config.cipher, mode);
  const auth = await rt.load('auth', config.auth, mode);
  return { transport, cipher, auth, hash: config.hash };
}

export function staticKeyFrom(base64: string, what: string): KeyPair {
  return keyPairFromPrivate(decodeKey(base64, what));
}

function forwardEventsToLog(events: EventBus, root: Logger): void {
  const server = root.child('server');
  const client = root.child('client');
  const side = (s: 'client' | 'server') => (s === 'server' ? server : client);
  const log = root.child('events');
  events.on('listening', (i) => (i.what.startsWith('server') ? server : client).info(`${i.what} listening on ${i.address}`));
  events.on('session:up', (i) =>
    side(i.side).info(i.side === 'server' ? `session up: ${i.client} from ${i.remote}` : `tunnel up to ${i.remote}`, {
      client: i.client,
      remote: i.remote,
    }),
  );
  events.on('session:down', (i) =>
    side(i.side).info(
      i.side === 'server'
        ? `session down: ${i.client} from ${i.remote}, ${formatBytes(i.bytesIn)} in, ${formatBytes(i.bytesOut)} out, ${formatDuration(i.durationMs)}`
        : `tunnel down (${i.reason ?? 'closed'}) after ${formatDuration(i.durationMs)}`,
      { ...i },
    ),
  );
  events.on('session:rekey', (i) => side(i.side).debug('session rekeyed', { ...i }));
  events.on('session:refused', (i) => server.debug(`silenced a connection from ${i.remote}: ${i.reason}`, { ...i }));
  events.on('stream:open', (i) => log.debug(`stream ${i.id} open to ${i.target}`, { ...i }));
  events.on('stream:close', (i) => log.debug(`stream ${i.id} to ${i.target} closed`, { ...i }));
  events.on('client:reconnect', (i) => client.warn(`tunnel lost (${i.reason}); reconnecting in ${formatDuration(i.delayMs)} (attempt ${i.attempt})`));
}

export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = -1;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(1)} ${units[i]}`;
}

export function formatDuration(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  const m = Math.floor(ms / 60_000);
  const s = Math.round((ms % 60_000) / 1000);
  return `${m} min ${s} s`;
}

/**
 * A PluginContext for tests: a silent logger, a fresh event bus, its own abort
 * signal and a minimal hand-built config. Pass overrides for what a test cares about.
 */
import { EventBus } from '../../core/events.ts';
import type { Logger, PluginContext, ResolvedConfig } from '../../core/types.ts';

export function silentLogger(): Logger {
  const log: Logger = {
    debug() {},
    info() {},
    warn() {},
    error() {},
    child: () => log,
  };
  return log;
}

export function testConfig(): ResolvedConfig {
  const baseDir = process.cwd();
  return {
    source: null,
    baseDir,
    transport: { use: 'tcp', options: {} },
    cipher: { use: 'chacha20-poly1305', options: {} },
    auth: { use: 'keys', options: {} },
    logging: [],
    hash: 'BLAKE2s',
    server: {
      listen: '127.0.0.1:0',
      privateKey: '',
      clients: [],
      egress: { allow: [] },
      handshakeTimeout: 10_000,
      handshakesPerSecond: 1000,
      handshakesPerSource: 20,
      clientsFile: '',
      publicAddress: '',
      outbound: { use: 'direct', options: {} },
      tun: false,
    },
    client: {
      server: '127.0.0.1:0',
      serverPublicKey: '',
      privateKey: '',
      socks: false,
      http: false,
      connectWait: 5_000,
      keepalive: 25_000,
      handshakeTimeout: 5_000,
      tun: false,
    },
  };
}

export function testContext(overrides: Partial<PluginContext> = {}): PluginContext {
  return {
    mode: 'server',
    log: silentLogger(),
    events: new EventBus(),
    signal: new AbortController().signal,
    config: testConfig(),
    baseDir: process.cwd(),
    ...overrides,
  };
}

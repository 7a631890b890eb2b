#!/usr/bin/env -S npx tsx
/**
 * The dshield command line: flags -> config -> client, server or local mode;
 * plus the key and config commands. Everything else lives in core/.
 *
 * Exit codes: 0 done, 1 a runtime failure (server unreachable, key mismatch,
 * no handshake answer), 2 a user's mistake (flags, config, keys).
 */
import { readFileSync } from 'node:fs';
import ora, { type Ora } from 'ora';
import { DshieldError, ErrorCodes, isDshieldError } from '../core/errors.ts';
import { loadConfig } from '../core/config.ts';
import { redactConfig, decodeKey, encodeKey } from '../core/keys.ts';
import { inspectPlugin, listBuiltins } from '../core/registry.ts';
import { createInvite } from '../core/invite.ts';
import { generateKeyPair, publicKeyFromPrivate } from '../core/x25519.ts';
import { createRuntime, type Runtime } from '../core/runtime.ts';
import { tuneGarbageCollector } from '../core/gc-tuning.ts';
import { tuneMalloc } from '../core/malloc-tuning.ts';
import { startServer } from '../core/server.ts';
import { startClient } from '../core/client.ts';
import { localConfig, startLocal } from '../core/local.ts';
import type { Mode, PluginKind, ResolvedConfig, ResolvedPluginRef } from '../core/types.ts';

const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };

const HELP = `dshield ${pkg.version} — Digital-Shield VPN

Usage:
  dshield --mode server [options]     accept tunnels and forward their traffic
  dshield --mode client [options]     open a tunnel; serve SOCKS5 and HTTP proxies
  dshield --mode local  [options]     server + client in one process on loopback (npm start)
  dshield keygen                      print a new X25519 key pair as JSON
  dshield pubkey                      read a private key on stdin, print its public key
  dshield invite NAME [options]       authorize a new client; print its connection string
  dshield check [options]             validate the config; print settings and plugins

Options:
  --mode MODE          server, client or local
  --config FILE        config file (.ts, .js or .json); default: search for dshield.config.ts
  --set KEY=VALUE      override a config key, e.g. --set client.server=10.0.0.5:8443
                       (repeatable; VALUE is parsed as JSON when it is JSON)
  --invite STRING      client: take server, keys and plugins from an invite
                       (same as DSHIELD_INVITE)
  --address HOST:PORT  invite: the address clients dial (default server.publicAddress)
  -h, --help           show this help
  -v, --version        print the version

Environment:
  DSHIELD_<KEY>        override any config key, levels joined by "__", any case:
                       DSHIELD_CLIENT__SERVER=10.0.0.5:8443  DSHIELD_TRANSPORT=ws
  DSHIELD_INVITE       as --invite
Precedence: defaults < config file < environment < --invite < --set and flags.
`;

interface Args {
  command: 'run' | 'keygen' | 'pubkey' | 'invite' | 'check' | 'help' | 'version';
  mode?: Mode | 'local';
  config?: string;
  sets: string[];
  invite?: string;
  address?: string;
  name?: string;
}

const VALUE_FLAGS = new Set(['--mode', '--config', '--set', '--invite', '--address']);
const MODES = ['server', 'client', 'local'];
const COMMANDS = ['keygen', 'pubkey', 'invite', 'check'];

function usage(message: string): never {
  throw new DshieldError(ErrorCodes.USAGE, `${message} (see dshield --help)`);
}

export function parseArgs(argv: string[]): Args {
  const args: Args = { command: 'run', sets: [] };
  const positional: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const raw = argv[i]!;
    if (raw === '-h' || raw === '--help') return { ...args, command: 'help' };
    if (raw === '-v' || raw === '--version') return { ...args, command: 'version' };
    if (!raw.startsWith('-')) {
      positional.push(raw);
      continue;
    }
    const eq = raw.indexOf('=');
    const flag = eq > 0 ? raw.slice(0, eq) : raw;
    if (!VALUE_FLAGS.has(flag)) usage(`unknown flag ${flag}`);
    let value: string | undefined = eq > 0 ? raw.slice(eq + 1) : argv[++i];
    if (value === undefined || (eq < 0 && value.startsWith('--'))) usage(`${flag} needs a value`);
    value = value as string;
    switch (flag) {
      case '--mode':
        if (!MODES.includes(value)) usage(`unknown mode "${value}": use server, client or local`);
        args.mode = value as Args['mode'];
        break;
      case '--config':
        args.config = value;
        break;
      case '--set':
        if (!value.includes('=')) usage(`--set needs KEY=VALUE, got "${value}"`);
        args.sets.push(value);
        break;
      case '--invite':
        args.invite = value;
        break;
      case '--address':
        args.address = value;
        break;
    }
  }
  if (positional.length > 0) {
    const [command, ...rest] = positional;
    if (!COMMANDS.includes(command!)) usage(`unknown command "${command}"`);
    args.command = command as Args['command'];
    if (args.command === 'invite') {
      if (rest.length !== 1) usage('invite needs exactly one NAME, e.g. dshield invite laptop');
      args.name = rest[0];
    } else if (rest.length > 0) {
      usage(`unexpected argument "${rest[0]}"`);
    }
  }
  if (args.command === 'run' && !args.mode) usage('choose a mode: --mode server, --mode client or --mode local');
  return args;
}

async function main(argv: string[]): Promise<number> {
  const args = parseArgs(argv);
  switch (args.command) {
    case 'help':
      process.stdout.write(HELP);
      return 0;
    case 'version':
      console.log(pkg.version);
      return 0;
    case 'keygen': {
      const kp = generateKeyPair();
      console.log(JSON.stringify({ privateKey: encodeKey(kp.privateKey), publicKey: encodeKey(kp.publicKey) }));
      return 0;
    }
    case 'pubkey': {
      const input = readFileSync(0, 'utf8').trim();
      console.log(encodeKey(publicKeyFromPrivate(decodeKey(input, 'the private key on stdin'))));
      return 0;
    }
    case 'invite': {
      const config = await loadConfig({ configPath: args.config, sets: args.sets });
      const { invite, client } = createInvite(config, args.name!, args.address);
      console.error(`authorized client "${client.name}" (${client.publicKey}) in ${config.server.clientsFile}`);
      console.error('give this connection string to the client, who runs: dshield --mode client --invite STRING');
      console.log(invite);
      return 0;
    }
    case 'check': {
      const config = await loadConfig({
        configPath: args.config,
        sets: args.sets,
        invite: args.invite ?? process.env.DSHIELD_INVITE,
        materializeKeys: false,
      });
      console.log(`config: ${config.source ?? '(built-in defaults: no config file found)'}`);
      console.log(JSON.stringify(redactConfig(config), null, 2));
      for (const { kind, ref, side } of configuredPlugins(config)) {
        const { def, file } = await inspectPlugin(kind, ref, config.baseDir, side === 'client' ? 'client' : 'server');
        console.log(`plugin ${kind} "${def.name}" (${side}): ${file}`);
      }
      const builtins = listBuiltins();
      console.log(
        `built-in: ${Object.entries(builtins)
          .map(([kind, names]) => `${kind} (${names.join(', ')})`)
          .join('; ')}`,
      );
      console.log('config OK');
      return 0;
    }
    case 'run':
      return run(args);
  }
}

async function run(args: Args): Promise<number> {
  const mode = args.mode!;
  const loaded = await loadConfig({
    configPath: args.config,
    sets: args.sets,
    invite: mode === 'client' ? (args.invite ?? process.env.DSHIELD_INVITE) : undefined,
    materializeKeys: mode === 'local' ? false : mode,
  });
  const config: ResolvedConfig = mode === 'local' ? localConfig(loaded) : loaded;
  tuneGarbageCollector();
  tuneMalloc();
  const rt = await createRuntime(config, { mode: mode === 'client' ? 'client' : 'server' });

  let spinner: Ora | undefined;
  const onConnecting = (server: string) => {
    spinner = ora({ text: `connecting to ${server}`, stream: process.stderr }).start();
  };
  let close: () => Promise<void>;
  try {
    if (mode === 'server') {
      const server = await startServer(rt);
      console.log(`dshield server listening on ${server.address} (${config.transport.use})`);
      console.log(`server public key: ${server.publicKey}`);
      close = () => server.close();
    } else if (mode === 'client') {
      const client = await startClient(rt, { onConnecting });
      spinner?.succeed(`tunnel up to ${config.client.server}`);
      for (const address of client.inbounds) {
        console.log(address.startsWith('tun:') ? `TUN ready: ${address.slice(4)}` : `proxy ready: ${address}`);
      }
      close = () => client.close();
    } else {
      const local = await startLocal(rt, onConnecting);
      spinner?.succeed(`local tunnel up (server on ${local.server.address})`);
      printLocalBanner(local.client.inbounds, local.demoUrl);
      close = () => local.close();
    }
  } catch (err) {
    spinner?.stop();
    await rt.close();
    throw err;
  }
  return waitForSignal(rt, close);
}

interface ConfiguredPlugin {
  kind: PluginKind;
  ref: ResolvedPluginRef;
  side: Mode | 'both';
}

/** Every plugin the config names, with the side that loads it. */
function configuredPlugins(config: ResolvedConfig): ConfiguredPlugin[] {
  const list: ConfiguredPlugin[] = [
    { kind: 'transport', ref: config.transport, side: 'both' },
    { kind: 'cipher', ref: config.cipher, side: 'both' },
    { kind: 'auth', ref: config.auth, side: 'both' },
    ...config.logging.map((ref) => ({ kind: 'logger' as const, ref, side: 'both' as const })),
    { kind: 'outbound', ref: config.server.outbound, side: 'server' },
  ];
  if (config.client.socks) list.push({ kind: 'inbound', ref: { use: 'socks5', options: { ...config.client.socks } }, side: 'client' });
  if (config.client.http) list.push({ kind: 'inbound', ref: { use: 'http', options: { ...config.client.http } }, side: 'client' });
  return list;
}

function printLocalBanner(inbounds: string[], demoUrl: string): void {
  const socks = inbounds.find((a) => a.startsWith('socks5://'));
  const http = inbounds.find((a) => a.startsWith('http://'));
  console.log('');
  if (socks) console.log(`  SOCKS5 proxy: ${socks}`);
  if (http) console.log(`  HTTP proxy:   ${http}`);
  console.log('');
  console.log('  Try it (fetches a page through the encrypted tunnel):');
  if (socks) console.log(`    curl --socks5-hostname ${socks.slice('socks5://'.length)} ${demoUrl}`);
  if (http) console.log(`    curl --proxy ${http} ${demoUrl}`);
  console.log('');
  console.log('  Any site works the same way, e.g. curl --socks5-hostname ... https://example.com');
  console.log('  Press Ctrl+C to stop.');
  console.log('');
}

function waitForSignal(rt: Runtime, close: () => Promise<void>): Promise<number> {
  return new Promise((resolve) => {
    let stopping = false;
    const stop = (signal: NodeJS.Signals) => {
      if (stopping) {
        console.error(`${signal} again: exiting now`);
        process.exit(1);
      }
      stopping = true;
      rt.events.emit('shutdown', { signal });
      rt.log.info(`${signal}: shutting down (streams get up to 5 s to finish)`);
      close()
        .catch((err: unknown) => rt.log.error(`error while shutting down: ${(err as Error).message}`))
        .finally(() => rt.close().finally(() => resolve(0)));
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
}

const RUNTIME_FAILURES = new Set<string>([
  ErrorCodes.UNREACHABLE,
  ErrorCodes.SERVER_KEY_MISMATCH,
  ErrorCodes.HANDSHAKE_TIMEOUT,
]);

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    if (isDshieldError(err) && (err.userError || RUNTIME_FAILURES.has(err.code))) {
      console.error(`dshield: ${err.code}: ${err.message}`);
      process.exit(err.userError ? 2 : 1);
    }
    console.error('dshield: unexpected error (a bug; please report it with this trace):');
    console.error(err);
    process.exit(1);
  },
);

/**
 * Loading the config: find the file (cosmiconfig) -> import it -> layer the
 * overrides on top -> validate -> read (or create) the keys.
 *
 * Layers, each overriding the one before:
 *
 *   built-in defaults < config file < environment (DSHIELD_*) < invite < --set
 *
 * Every mistake stops loading with one DshieldError line that names the key,
 * says what is wrong and where the value came from, e.g.
 *
 *   unknown key "server.listne" (did you mean "server.listen"?) (in /etc/dshield/dshield.config.ts)
 *   client.socks: expected "host:port" or false, got 1080 (from DSHIELD_CLIENT__SOCKS)
 *
 * Plugin options are not checked here: the registry checks them against the
 * plugin's own schema when it loads the plugin.
 */
import { existsSync, readFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { cosmiconfig, type Loader } from 'cosmiconfig';
import { isIp, parseCidr } from './cidr.ts';
import { DshieldError, ErrorCodes, isDshieldError, type ErrorCode } from './errors.ts';
import { parseHostPort } from './hostport.ts';
import { parseInvite } from './invite.ts';
import { decodeKey, encodeKey, ensureKeyPair, isInlineKey, privateKeyPathFor, readKeyRef } from './keys.ts';
import type {
  ClientEntry,
  ClientTunConfig,
  Logger,
  Mode,
  ProxyListenConfig,
  ResolvedConfig,
  ResolvedPluginRef,
  ServerTunConfig,
  UserConfig,
} from './types.ts';

// ---------------------------------------------------------------------------
// Public API

export interface LoadConfigOptions {
  /** Load exactly this file (.ts, .mts, .js, .mjs, .json). Without it, search `cwd`. */
  configPath?: string;
  /** Where to search for dshield.config.* and what relative paths mean without a file. Default process.cwd(). */
  cwd?: string;
  /** The environment to read DSHIELD_* overrides from. Default process.env. */
  env?: NodeJS.ProcessEnv;
  /** "key.path=value" overrides, in order (the CLI's repeatable --set). */
  sets?: string[];
  /** A `dshield://` connection string (dshield invite): server, keys and plugins for a client. */
  invite?: string;
  /**
   * Read key files into base64 and create missing private keys (default true).
   * true: both sides (a machine running both); 'server' or 'client': only that
   * side's keys, so a client does not create server keys it has no use for;
   * false: leave paths as written (only inline keys are checked) - for `check`.
   */
  materializeKeys?: boolean | Mode;
  /** Told (info) when a key pair is created. Never given key material. */
  log?: Logger;
  /** More DSHIELD_* names to leave alone, besides RESERVED_ENV_NAMES. */
  reservedEnv?: readonly string[];
}

/**
 * DSHIELD_* variables that are not config keys: the CLI reads them itself.
 * loadConfig ignores them (and any name starting with a RESERVED_ENV_PREFIXES
 * entry) instead of reporting an unknown key.
 */
export const RESERVED_ENV_NAMES: readonly string[] = Object.freeze(['DSHIELD_INVITE']);
/** Test and benchmark harness settings (DSHIELD_TEST_VERBOSE, DSHIELD_TEST_FILE_TIMEOUT...). */
export const RESERVED_ENV_PREFIXES: readonly string[] = Object.freeze(['DSHIELD_TEST_', 'DSHIELD_BENCH_']);

/** Every settable key path, e.g. "client.serverPublicKey" (for help texts and docs). */
export function listConfigKeys(): string[] {
  return leafPaths(SCHEMA, []).map((p) => p.join('.'));
}

/**
 * Loads, layers and validates the config. Throws DshieldError(CONFIG) for a
 * malformed setting, DshieldError(KEY) for a missing or malformed key, each
 * with one line naming the key and the value's origin.
 */
export async function loadConfig(opts: LoadConfigOptions = {}): Promise<ResolvedConfig> {
  const cwd = resolve(opts.cwd ?? process.cwd());
  const env = opts.env ?? process.env;
  const found = await findConfigFile(opts.configPath, cwd);
  const baseDir = found ? dirname(found.path) : cwd;

  // source and baseDir first, so a printed config reads top-down.
  const tree: Tree = { source: found?.path ?? null, baseDir };
  const sources = new Map<string, Origin>();
  const apply = new Applier(tree, sources);

  apply.object(DEFAULTS as Record<string, unknown>, SCHEMA, [], { kind: 'default' });
  if (found && found.config !== undefined) {
    const origin: Origin = { kind: 'file', file: found.path };
    if (!isPlainObject(found.config)) {
      throw configError(`${found.path}: the config must be an object, like export default defineConfig({ ... }), got ${describe(found.config)}`);
    }
    apply.object(found.config, SCHEMA, [], origin);
  }
  for (const { name, value } of envOverrides(env, opts.reservedEnv ?? [])) {
    apply.override(name.slice(ENV_PREFIX.length).split('__'), value, { kind: 'env', name });
  }
  if (opts.invite !== undefined && opts.invite.trim() !== '') {
    apply.object(parseInvite(opts.invite) as Record<string, unknown>, SCHEMA, [], { kind: 'invite' });
  }
  for (const text of opts.sets ?? []) {
    const eq = text.indexOf('=');
    if (eq <= 0) throw configError(`--set ${text}: expected key.path=value, e.g. --set client.server=10.0.0.5:8443`);
    // Messages name only the key: the value may be a secret (--set client.privateKey=...).
    const key = text.slice(0, eq).trim();
    apply.override(key.split('.'), text.slice(eq + 1), { kind: 'set', key });
  }
  apply.finish();

  const config = tree as unknown as ResolvedConfig;
  config.server.clientsFile = resolve(baseDir, config.server.clientsFile);
  if (config.server.tun) {
    config.server.tun.leasesFile = resolve(baseDir, config.server.tun.leasesFile);
    config.server.tun.stateDir = resolve(baseDir, config.server.tun.stateDir);
  }
  if (config.client.tun) {
    config.client.tun.stateDir = resolve(baseDir, config.client.tun.stateDir);
    config.client.tun.resolvConf = resolve(baseDir, config.client.tun.resolvConf);
  }

  mergeClientsFile(config);
  const side = opts.materializeKeys ?? true;
  if (side === true || side === 'server') materializeServerKeys(config, sources, opts.log);
  if (side === true || side === 'client') materializeClientKeys(config, sources, opts.log);
  checkDistinctClientKeys(config);
  return config;
}

// ---------------------------------------------------------------------------
// Schema and defaults

type LeafType =
  | 'plugin'
  | 'pluginList'
  | 'hash'
  | 'hostport'
  | 'serverAddress'
  | 'publicAddress'
  | 'key'
  | 'path'
  | 'ms'
  | 'perSecond'
  | 'clients'
  | 'cidrs'
  | 'proxy'
  | 'clientTun'
  | 'serverTun';

interface LeafSpec {
  leaf: LeafType;
  /** For 'proxy': the listen address used when the proxy is switched on without one. */
  defaultListen?: string;
}
interface SchemaNode {
  [key: string]: SchemaNode | LeafSpec;
}

function leaf(type: LeafType, defaultListen?: string): LeafSpec {
  return defaultListen === undefined ? { leaf: type } : { leaf: type, defaultListen };
}

const isLeaf = (spec: SchemaNode | LeafSpec): spec is LeafSpec => typeof (spec as LeafSpec).leaf === 'string';

type Required2<T> = { [K in keyof Required<T>]: unknown };

/** The shape of UserConfig (the `satisfies` keeps the two in step). */
const SCHEMA = {
  transport: leaf('plugin'),
  cipher: leaf('plugin'),
  auth: leaf('plugin'),
  logging: leaf('pluginList'),
  hash: leaf('hash'),
  server: {
    listen: leaf('hostport'),
    privateKey: leaf('key'),
    clients: leaf('clients'),
    egress: { allow: leaf('cidrs') } satisfies Required2<NonNullable<NonNullable<UserConfig['server']>['egress']>>,
    handshakeTimeout: leaf('ms'),
    handshakesPerSecond: leaf('perSecond'),
    handshakesPerSource: leaf('perSecond'),
    clientsFile: leaf('path'),
    publicAddress: leaf('publicAddress'),
    outbound: leaf('plugin'),
    tun: leaf('serverTun'),
  } satisfies Required2<NonNullable<UserConfig['server']>>,
  client: {
    server: leaf('serverAddress'),
    serverPublicKey: leaf('key'),
    privateKey: leaf('key'),
    socks: leaf('proxy', '127.0.0.1:1080'),
    http: leaf('proxy', '127.0.0.1:8080'),
    connectWait: leaf('ms'),
    keepalive: leaf('ms'),
    handshakeTimeout: leaf('ms'),
    tun: leaf('clientTun'),
  } satisfies Required2<NonNullable<UserConfig['client']>>,
} satisfies Required2<UserConfig> & SchemaNode;

/** The built-in defaults: what runs with no config file at all. */
const DEFAULTS = {
  transport: 'tcp',
  cipher: 'chacha20-poly1305',
  auth: 'keys',
  hash: 'BLAKE2s',
  logging: [{ use: 'console', level: 'info' }, { use: 'file', dir: 'logs' }],
  server: {
    listen: '0.0.0.0:8443',
    privateKey: 'keys/server.key',
    clients: [],
    egress: { allow: [] },
    handshakeTimeout: 15_000,
    handshakesPerSecond: 1000,
    handshakesPerSource: 20,
    clientsFile: 'keys/clients.json',
    publicAddress: '',
    outbound: 'direct',
    tun: false,
  },
  client: {
    server: '127.0.0.1:8443',
    serverPublicKey: 'keys/server.pub',
    privateKey: 'keys/client.key',
    socks: '127.0.0.1:1080',
    http: '127.0.0.1:8080',
    connectWait: 10_000,
    keepalive: 25_000,
    handshakeTimeout: 10_000,
    tun: false,
  },
} satisfies Required<UserConfig>;

function leafPaths(node: SchemaNode, prefix: string[]): string[][] {
  const out: string[][] = [];
  for (const [key, spec] of Object.entries(node)) {
    if (isLeaf(spec)) out.push([...prefix, key]);
    else out.push(...leafPaths(spec, [...prefix, key]));
  }
  return out;
}

// ---------------------------------------------------------------------------
// Finding and importing the file

const SEARCH_PLACES = [
  'dshield.config.ts',
  'dshield.config.mts',
  'dshield.config.js',
  'dshield.config.mjs',
  'dshield.config.json',
  '.dshieldrc.json',
  'package.json',
];

/**
 * cosmiconfig's own TypeScript loader compiles with the installed
 * TypeScript, which breaks across major versions; tsx already runs us, so a
 * plain import() of the file works for .ts as for .js.
 */
const importLoader: Loader = async (filepath) => {
  let mod: { default?: unknown };
  try {
    mod = (await import(pathToFileURL(filepath).href)) as { default?: unknown };
  } catch (err) {
    if (isDshieldError(err)) throw err;
    throw configError(`${filepath}: cannot load it: ${firstLine(err)}`, err);
  }
  if (mod.default === undefined) {
    throw configError(`${filepath}: has no default export; write export default defineConfig({ ... })`);
  }
  return mod.default;
};

async function findConfigFile(configPath: string | undefined, cwd: string): Promise<{ path: string; config: unknown } | null> {
  const explorer = cosmiconfig('dshield', {
    searchPlaces: SEARCH_PLACES,
    searchStrategy: 'none',
    cache: false,
    loaders: { '.ts': importLoader, '.mts': importLoader, '.js': importLoader, '.mjs': importLoader },
  });
  try {
    if (configPath !== undefined) {
      const path = resolve(cwd, configPath);
      if (!existsSync(path)) throw configError(`config file ${configPath} does not exist (looked for ${path})`);
      const result = await explorer.load(path);
      // An empty file is an empty config: defaults everywhere.
      return { path, config: result?.isEmpty ? {} : result?.config };
    }
    const result = await explorer.search(cwd);
    return result ? { path: result.filepath, config: result.isEmpty ? {} : result.config } : null;
  } catch (err) {
    if (isDshieldError(err)) throw err;
    const file = (err as { filepath?: string }).filepath ?? configPath ?? cwd;
    throw configError(`${file}: cannot read the config: ${firstLine(err)}`, err);
  }
}

// ---------------------------------------------------------------------------
// Layering

/** Where a value came from, for error messages. */
type Origin =
  | { kind: 'default' }
  | { kind: 'file'; file: string }
  | { kind: 'env'; name: string }
  | { kind: 'invite' }
  | { kind: 'set'; key: string };

function originText(origin: Origin | undefined): string {
  switch (origin?.kind) {
    case 'file':
      return ` (in ${origin.file})`;
    case 'env':
      return ` (from ${origin.name})`;
    case 'invite':
      return ' (from the invite)';
    case 'set':
      return ` (from --set ${origin.key})`;
    default:
      return '';
  }
}

type Tree = Record<string, unknown>;

/** A problem with one value; the Applier adds the key path and origin. */
class Problem extends Error {
  constructor(
    message: string,
    readonly code: ErrorCode = ErrorCodes.CONFIG,
    /** A path below the key ("[2]", ".name") where the problem is. */
    readonly at = '',
  ) {
    super(message);
  }
}

const ENV_PREFIX = 'DSHIELD_';

function envOverrides(env: NodeJS.ProcessEnv, extraReserved: readonly string[]): { name: string; value: string }[] {
  const reserved = new Set([...RESERVED_ENV_NAMES, ...extraReserved].map((n) => n.toUpperCase()));
  const out: { name: string; value: string; depth: number }[] = [];
  for (const [name, value] of Object.entries(env)) {
    const upper = name.toUpperCase();
    if (!upper.startsWith(ENV_PREFIX) || value === undefined) continue;
    if (reserved.has(upper) || RESERVED_ENV_PREFIXES.some((p) => upper.startsWith(p))) continue;
    // An empty variable (FOO= in a compose file) means "not set".
    if (value === '') continue;
    out.push({ name, value, depth: name.split('__').length });
  }
  // Whole values before their parts: DSHIELD_TRANSPORT=ws, then DSHIELD_TRANSPORT__PATH=/x.
  out.sort((a, b) => a.depth - b.depth || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  return out;
}

/** A command-line or environment value: JSON when it parses as JSON, else the text itself. */
function parseOverrideValue(text: string): unknown {
  const trimmed = text.trim();
  if (trimmed === '') return text;
  try {
    return JSON.parse(trimmed);
  } catch {
    return text;
  }
}

class Applier {
  constructor(
    private readonly tree: Tree,
    private readonly sources: Map<string, Origin>,
  ) {}

  /** Merges a structured layer (defaults, the file, an invite) into the tree. */
  object(layer: Record<string, unknown>, node: SchemaNode, path: string[], origin: Origin): void {
    for (const [key, value] of Object.entries(layer)) {
      if (value === undefined) continue;
      const spec = Object.hasOwn(node, key) ? node[key]! : undefined;
      const keyPath = [...path, key];
      if (!spec) {
        throw configError(`unknown key "${keyPath.join('.')}"${suggestKey(keyPath)}${originText(origin)}`);
      }
      if (isLeaf(spec)) {
        this.setLeaf(keyPath, spec, value, undefined, origin);
      } else {
        if (!isPlainObject(value)) {
          throw configError(`${keyPath.join('.')}: expected an object of settings, got ${describe(value)}${originText(origin)}`);
        }
        this.object(value, spec, keyPath, origin);
      }
    }
  }

  /**
   * One DSHIELD_* variable or --set: `segments` matched case-insensitively
   * against the schema. Past a plugin ref they name plugin options
   * (transport.path), past a proxy its listen address or options, past
   * logging an entry by index or by plugin name (logging.console.level).
   */
  override(segments: string[], text: string, origin: Origin): void {
    const label = origin.kind === 'env' ? origin.name : `--set ${(origin as { key: string }).key}`;
    const value = parseOverrideValue(text);
    let node: SchemaNode = SCHEMA;
    const path: string[] = [];
    for (let i = 0; i < segments.length; i++) {
      const seg = segments[i]!;
      const key = Object.keys(node).find((k) => k.toLowerCase() === seg.toLowerCase());
      if (seg === '' || key === undefined) {
        const wanted = segments.map((s) => s.toLowerCase());
        throw configError(`${label}: no config key ${wanted.join('.')}${suggestOverride(wanted, origin)}`);
      }
      path.push(key);
      const spec = node[key]!;
      if (isLeaf(spec)) {
        const rest = segments.slice(i + 1);
        if (rest.length === 0) this.setLeaf(path, spec, value, text, origin);
        else this.setPart(path, spec, rest, value, text, origin, label);
        return;
      }
      node = spec;
    }
    // A whole section at once: DSHIELD_SERVER__EGRESS='{"allow":["10.0.0.0/8"]}'.
    if (!isPlainObject(value)) {
      throw configError(`${path.join('.')}: expected a JSON object of settings, got ${describe(value)}${originText(origin)}`);
    }
    this.object(value, node, path, origin);
  }

  /**
   * Bad values wait here, by key path, until every layer is applied: a later
   * layer may replace a bad value (fixing a broken file with --set works).
   * finish() throws the first one left.
   */
  private readonly pending = new Map<string, DshieldError>();

  finish(): void {
    for (const err of this.pending.values()) throw err;
  }

  private setLeaf(path: string[], spec: LeafSpec, value: unknown, text: string | undefined, origin: Origin): void {
    const where = path.join('.');
    let normalized: unknown;
    try {
      normalized = normalizeLeaf(spec, value, text);
    } catch (err) {
      if (err instanceof Problem) {
        this.pending.set(where, new DshieldError(err.code, `${where}${err.at}: ${err.message}${originText(origin)}`));
        return;
      }
      throw err;
    }
    this.pending.delete(where);
    this.put(path, normalized);
    this.sources.set(where, origin);
  }

  private put(path: string[], value: unknown): void {
    let at: Tree = this.tree;
    for (const key of path.slice(0, -1)) {
      if (!isPlainObject(at[key])) at[key] = {};
      at = at[key] as Tree;
    }
    at[path[path.length - 1]!] = value;
  }

  private get(path: string[]): unknown {
    let at: unknown = this.tree;
    for (const key of path) at = isPlainObject(at) ? at[key] : undefined;
    return at;
  }

  /** A value below a leaf: a plugin option, a proxy's listen address, a logging entry. */
  private setPart(
    path: string[],
    spec: LeafSpec,
    rest: string[],
    value: unknown,
    text: string,
    origin: Origin,
    label: string,
  ): void {
    const where = path.join('.');
    // A part of a value that is itself bad cannot be set: report the bad value.
    const broken = this.pending.get(where);
    if (broken) throw broken;
    // Environment names are upper case; the registry matches option names case-insensitively.
    const optionPath = origin.kind === 'env' ? rest.map((s) => s.toLowerCase()) : rest;
    const fail = (why: string): never => {
      throw configError(`${label}: ${why}`);
    };
    if (rest.some((s) => s === '')) fail(`empty name in ${where}.${rest.join('.')}`);
    switch (spec.leaf) {
      case 'plugin': {
        const ref = this.get(path) as ResolvedPluginRef;
        setNested(ref.options, optionPath, value, origin.kind === 'env');
        this.sources.set(`${where}.${optionPath.join('.')}`, origin);
        return;
      }
      case 'proxy': {
        let proxy = this.get(path) as ProxyListenConfig | false;
        if (proxy === false) {
          proxy = { listen: spec.defaultListen! };
          this.put(path, proxy);
        }
        if (optionPath.length === 1 && optionPath[0]!.toLowerCase() === 'listen') {
          const listen = typeof value === 'string' ? value : text;
          try {
            proxy.listen = checkHostPort(listen, `${where}.listen`);
          } catch (err) {
            throw withOrigin(err, origin);
          }
        } else {
          setNested(proxy, optionPath, value, origin.kind === 'env');
        }
        this.sources.set(`${where}.${optionPath.join('.')}`, origin);
        return;
      }
      case 'pluginList': {
        const list = this.get(path) as ResolvedPluginRef[];
        const [selector, ...optionRest] = optionPath;
        const index = /^\d+$/.test(selector!)
          ? Number(selector)
          : list.findIndex((r) => r.use.toLowerCase() === selector!.toLowerCase());
        if (index < 0 || index >= list.length) {
          const uses = list.map((r, i) => `${i} (${r.use})`).join(', ') || 'none';
          fail(`${where} has no entry "${selector}" (entries: ${uses})`);
        }
        if (optionRest.length === 0) {
          try {
            list[index] = normalizePluginRef(value, text);
          } catch (err) {
            if (err instanceof Problem) throw configError(`${where}[${index}]: ${err.message}${originText(origin)}`);
            throw err;
          }
        } else {
          setNested(list[index]!.options, optionRest, value, origin.kind === 'env');
        }
        this.sources.set(`${where}[${index}]`, origin);
        return;
      }
      case 'clientTun':
      case 'serverTun': {
        // DSHIELD_CLIENT__TUN__KILLSWITCH=true, --set server.tun.subnet=10.77.0.0/24: one field of the
        // section (switching TUN mode on with defaults for the rest if it was off).
        if (optionPath.length !== 1) fail(`${where} has no setting "${optionPath.join('.')}"`);
        const fields = spec.leaf === 'clientTun' ? CLIENT_TUN_FIELDS : SERVER_TUN_FIELDS;
        const field = fields.find((f) => f.toLowerCase() === optionPath[0]!.toLowerCase());
        if (field === undefined) {
          fail(`${where} has no setting "${optionPath[0]}"${suggestFrom(optionPath[0]!, fields)} (settings: ${fields.join(', ')})`);
        }
        const current = this.get(path) as ClientTunConfig | ServerTunConfig | false;
        const raw: Record<string, unknown> = current === false ? {} : { ...current };
        if (raw.routes === null) delete raw.routes;
        if (raw.subnet6 === '') delete raw.subnet6;
        // A field that wants a string takes the text as written (a name "0" stays "0").
        raw[field!] = typeof value === 'number' && TUN_TEXT_FIELDS.has(field!) ? text.trim() : value;
        try {
          this.put(path, normalizeLeaf(spec, raw, undefined));
        } catch (err) {
          if (err instanceof Problem) throw new DshieldError(err.code, `${where}${err.at}: ${err.message}${originText(origin)}`);
          throw err;
        }
        this.sources.set(`${where}.${field}`, origin);
        return;
      }
      default:
        fail(`${where} is a single value; it has no part "${rest.join('.')}" (set ${where} itself${spec.leaf === 'clients' || spec.leaf === 'cidrs' ? ', as a JSON list' : ''})`);
    }
  }
}

/**
 * Sets obj[a][b]... = value, creating plain objects on the way. With
 * `foldCase` (environment names), a segment matches an existing key in any
 * case, so DSHIELD_TRANSPORT__CONNECTTIMEOUT replaces the file's connectTimeout.
 */
function setNested(obj: Record<string, unknown>, path: string[], value: unknown, foldCase: boolean): void {
  let at = obj;
  path.forEach((segment, i) => {
    const key = (foldCase && Object.keys(at).find((k) => k.toLowerCase() === segment.toLowerCase())) || segment;
    if (i === path.length - 1) {
      at[key] = value;
      return;
    }
    if (!isPlainObject(at[key])) at[key] = {};
    at = at[key] as Record<string, unknown>;
  });
}

/** A copy of plain data (objects, lists); anything else (a stream, a function from a .ts config) is kept as is. */
function copyData<T>(value: T): T {
  if (Array.isArray(value)) return value.map(copyData) as T;
  if (isPlainObject(value)) {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) out[k] = copyData(v);
    return out as T;
  }
  return value;
}

function withOrigin(err: unknown, origin: Origin): unknown {
  if (isDshieldError(err)) return new DshieldError(err.code, `${err.message}${originText(origin)}`, { cause: err });
  return err;
}

// ---------------------------------------------------------------------------
// Values

/**
 * Checks and normalizes one value for its key. `text` is the raw string when
 * the value came from the environment or --set: where the key wants a string,
 * the text is taken as written (so 8443 stays "8443", not a number).
 */
function normalizeLeaf(spec: LeafSpec, value: unknown, text: string | undefined): unknown {
  const asText = (v: unknown): unknown => (text !== undefined && (typeof v === 'number' || typeof v === 'boolean') ? text.trim() : v);
  switch (spec.leaf) {
    case 'plugin':
      return normalizePluginRef(value, text);
    case 'pluginList': {
      if (!Array.isArray(value)) {
        throw new Problem(`expected a list of plugins, like [{ use: 'console', level: 'info' }], got ${describe(value)}`);
      }
      return value.map((item, i) => {
        try {
          return normalizePluginRef(item, undefined);
        } catch (err) {
          if (err instanceof Problem) throw new Problem(err.message, err.code, `[${i}]`);
          throw err;
        }
      });
    }
    case 'hash': {
      const v = asText(value);
      const canonical = typeof v === 'string' ? HASHES.find((h) => h.toLowerCase() === v.trim().toLowerCase()) : undefined;
      if (!canonical) throw new Problem(`expected one of ${HASHES.map((h) => `"${h}"`).join(', ')}, got ${describe(v)}`);
      return canonical;
    }
    case 'hostport': {
      const v = asText(value);
      if (typeof v !== 'string') throw new Problem(`expected "host:port", got ${describe(v)}`);
      return checkHostPort(v);
    }
    case 'serverAddress':
    case 'publicAddress': {
      const v = asText(value);
      if (typeof v !== 'string') throw new Problem(`expected "host:port" or a ws:// or wss:// URL, got ${describe(v)}`);
      if (spec.leaf === 'publicAddress' && v.trim() === '') return '';
      return checkServerAddress(v);
    }
    case 'key': {
      const v = asText(value);
      if (typeof v !== 'string' || v.trim() === '') {
        throw new Problem(`expected a base64 key or the path of a key file, got ${describe(v, true)}`);
      }
      if (isInlineKey(v)) {
        try {
          return encodeKey(decodeKey(v, 'x'));
        } catch {
          throw new Problem('not a key (expected base64 of 32 bytes, as "wg genkey" prints, or the path of a file holding one)', ErrorCodes.KEY);
        }
      }
      return v.trim();
    }
    case 'path': {
      const v = asText(value);
      if (typeof v !== 'string' || v.trim() === '') throw new Problem(`expected a file path, got ${describe(v)}`);
      return v.trim();
    }
    case 'ms': {
      if (typeof value !== 'number' || !Number.isInteger(value) || value <= 0 || value > MAX_TIMER_MS) {
        throw new Problem(`expected a whole number of milliseconds (1 to ${MAX_TIMER_MS}), got ${describe(value)}`);
      }
      return value;
    }
    case 'perSecond': {
      if (typeof value !== 'number' || !Number.isInteger(value) || value <= 0 || value > MAX_PER_SECOND) {
        throw new Problem(`expected a whole number per second (1 to ${MAX_PER_SECOND}), got ${describe(value)}`);
      }
      return value;
    }
    case 'clients':
      return normalizeClients(value);
    case 'cidrs': {
      // From the environment or --set, a plain comma-separated list is fine too.
      const list = text !== undefined && typeof value === 'string' ? value.split(',').map((s) => s.trim()).filter(Boolean) : value;
      if (!Array.isArray(list)) throw new Problem(`expected a list of address ranges, like ["10.0.0.0/8"], got ${describe(list)}`);
      return list.map((item, i) => {
        if (typeof item !== 'string') throw new Problem(`expected an address range like "10.0.0.0/8", got ${describe(item)}`, ErrorCodes.CONFIG, `[${i}]`);
        try {
          parseCidr(item);
        } catch (err) {
          throw new Problem(isDshieldError(err) ? err.message : String(err), ErrorCodes.CONFIG, `[${i}]`);
        }
        return item.trim();
      });
    }
    case 'proxy': {
      // false switches the proxy off; only a number from the command line is text ("1080").
      const v = typeof value === 'number' ? asText(value) : value;
      if (v === false) return false;
      if (v === true) return { listen: spec.defaultListen! };
      if (typeof v === 'string') return { listen: checkHostPort(v) };
      if (isPlainObject(v)) {
        const listen = v.listen ?? spec.defaultListen!;
        if (typeof listen !== 'string') throw new Problem(`expected "host:port", got ${describe(listen)}`, ErrorCodes.CONFIG, '.listen');
        let checked: string;
        try {
          checked = checkHostPort(listen);
        } catch (err) {
          if (err instanceof Problem) throw new Problem(err.message, err.code, '.listen');
          throw err;
        }
        return { ...copyData(v), listen: checked };
      }
      throw new Problem(`expected "host:port" or false, got ${describe(v)}`);
    }
    case 'clientTun':
      return normalizeClientTun(value);
    case 'serverTun':
      return normalizeServerTun(value);
  }
}

// ---------------------------------------------------------------------------
// TUN mode sections

const CLIENT_TUN_FIELDS = ['name', 'routes', 'exclude', 'dns', 'killSwitch', 'queues', 'stateDir', 'resolvConf'] as const;
const SERVER_TUN_FIELDS = ['subnet', 'subnet6', 'nat', 'dns', 'clientToClient', 'name', 'leasesFile', 'mtu', 'stateDir'] as const;
const TUN_TEXT_FIELDS: ReadonlySet<string> = new Set(['name', 'stateDir', 'leasesFile', 'resolvConf']);
const DEFAULT_TUN_STATE_DIR = '/var/lib/dshield';
const DEFAULT_TUN_DEVICE = 'dshield%d';
/** An interface name (at most 15 bytes), or a pattern with one %d the kernel fills in. */
const TUN_NAME_RE = /^(?=.{1,15}$)[A-Za-z0-9_.-]*(%d)?[A-Za-z0-9_.-]*$/;

/** Checks a section's fields: a plain object (true: all defaults) with no unknown field. */
function tunSection(value: unknown, fields: readonly string[], example: string): Record<string, unknown> | false {
  if (value === false || value === undefined || value === null) return false;
  if (value === true) return {};
  if (!isPlainObject(value)) throw new Problem(`expected true, false or ${example}, got ${describe(value)}`);
  for (const key of Object.keys(value)) {
    if (!fields.includes(key)) throw new Problem(`unknown setting "${key}"${suggestFrom(key, fields)} (settings: ${fields.join(', ')})`);
  }
  return value;
}

function tunBoolean(v: unknown, field: string, fallback: boolean): boolean {
  if (v === undefined) return fallback;
  if (typeof v !== 'boolean') throw new Problem(`expected true or false, got ${describe(v)}`, ErrorCodes.CONFIG, `.${field}`);
  return v;
}

function tunText(v: unknown, field: string, fallback: string): string {
  if (v === undefined) return fallback;
  if (typeof v !== 'string' || v.trim() === '') throw new Problem(`expected a non-empty string, got ${describe(v)}`, ErrorCodes.CONFIG, `.${field}`);
  return v.trim();
}

function tunName(v: unknown): string {
  const name = tunText(v, 'name', DEFAULT_TUN_DEVICE);
  if (!TUN_NAME_RE.test(name)) {
    throw new Problem(`expected an interface name of at most 15 letters, digits, "_", "." or "-" (optionally with one %d), got ${describe(name)}`, ErrorCodes.CONFIG, '.name');
  }
  return name;
}

function tunInteger(v: unknown, field: string, fallback: number, min: number, max: number): number {
  if (v === undefined) return fallback;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    throw new Problem(`expected a whole number from ${min} to ${max}, got ${describe(v)}`, ErrorCodes.CONFIG, `.${field}`);
  }
  return v;
}

/** A list of CIDRs (a comma-separated string is fine too), each checked. */
function tunCidrs(v: unknown, field: string): string[] {
  const list = typeof v === 'string' ? v.split(',').map((s) => s.trim()).filter(Boolean) : v;
  if (!Array.isArray(list)) throw new Problem(`expected a list of address ranges, like ["10.0.0.0/8"], got ${describe(list)}`, ErrorCodes.CONFIG, `.${field}`);
  return list.map((item, i) => {
    if (typeof item !== 'string') throw new Problem(`expected an address range like "10.0.0.0/8", got ${describe(item)}`, ErrorCodes.CONFIG, `.${field}[${i}]`);
    try {
      parseCidr(item);
    } catch (err) {
      throw new Problem(isDshieldError(err) ? err.message : String(err), ErrorCodes.CONFIG, `.${field}[${i}]`);
    }
    return item.trim();
  });
}

function normalizeClientTun(value: unknown): ClientTunConfig | false {
  const v = tunSection(value, CLIENT_TUN_FIELDS, '{ routes, exclude, dns, killSwitch, ... }');
  if (v === false) return false;
  return {
    name: tunName(v.name),
    routes: v.routes === undefined || v.routes === null ? null : tunCidrs(v.routes, 'routes'),
    exclude: v.exclude === undefined ? [] : tunCidrs(v.exclude, 'exclude'),
    dns: tunBoolean(v.dns, 'dns', true),
    killSwitch: tunBoolean(v.killSwitch, 'killSwitch', false),
    queues: tunInteger(v.queues, 'queues', 1, 1, 256),
    stateDir: tunText(v.stateDir, 'stateDir', DEFAULT_TUN_STATE_DIR),
    resolvConf: tunText(v.resolvConf, 'resolvConf', '/etc/resolv.conf'),
  };
}

function normalizeServerTun(value: unknown): ServerTunConfig | false {
  const v = tunSection(value, SERVER_TUN_FIELDS, '{ subnet, subnet6, nat, dns, ... }');
  if (v === false) return false;
  const subnet = tunText(v.subnet, 'subnet', '10.66.0.0/24');
  let v4;
  try {
    v4 = parseCidr(subnet);
  } catch (err) {
    throw new Problem(isDshieldError(err) ? err.message : String(err), ErrorCodes.CONFIG, '.subnet');
  }
  // The server takes the first address, clients the rest: a /30 is the smallest pool with a client.
  if (v4.family !== 4 || v4.prefix < 8 || v4.prefix > 30) {
    throw new Problem(`expected an IPv4 range from /8 to /30, like "10.66.0.0/24", got ${describe(subnet)}`, ErrorCodes.CONFIG, '.subnet');
  }
  let subnet6 = '';
  if (v.subnet6 !== undefined && v.subnet6 !== '' && v.subnet6 !== false && v.subnet6 !== null) {
    subnet6 = tunText(v.subnet6, 'subnet6', '');
    let c6;
    try {
      c6 = parseCidr(subnet6);
    } catch (err) {
      throw new Problem(isDshieldError(err) ? err.message : String(err), ErrorCodes.CONFIG, '.subnet6');
    }
    // Each client's IPv6 address carries its IPv4 host number, so the IPv6 range needs at least as many host bits.
    if (c6.family !== 6 || 128 - c6.prefix < 32 - v4.prefix || c6.prefix < 16) {
      throw new Problem(
        `expected an IPv6 range with at least as many addresses as subnet (e.g. "fd66::/64"), got ${describe(subnet6)}`,
        ErrorCodes.CONFIG,
        '.subnet6',
      );
    }
  }
  const dnsList = v.dns === undefined ? ['1.1.1.1'] : typeof v.dns === 'string' ? v.dns.split(',').map((s) => s.trim()).filter(Boolean) : v.dns;
  if (!Array.isArray(dnsList) || dnsList.length === 0) {
    throw new Problem(`expected a resolver address or a list of them, like ["1.1.1.1"], got ${describe(v.dns)}`, ErrorCodes.CONFIG, '.dns');
  }
  const dns = dnsList.map((d, i) => {
    if (typeof d !== 'string' || !isIp(d.trim())) throw new Problem(`expected an IP address, got ${describe(d)}`, ErrorCodes.CONFIG, `.dns[${i}]`);
    return d.trim();
  });
  const mtu = tunInteger(v.mtu, 'mtu', 1420, 576, 65_000);
  if (subnet6 !== '' && mtu < 1280) throw new Problem(`IPv6 needs an MTU of at least 1280, got ${mtu}`, ErrorCodes.CONFIG, '.mtu');
  return {
    subnet,
    subnet6,
    nat: tunBoolean(v.nat, 'nat', true),
    dns,
    clientToClient: tunBoolean(v.clientToClient, 'clientToClient', false),
    name: tunName(v.name),
    leasesFile: tunText(v.leasesFile, 'leasesFile', 'keys/leases.json'),
    mtu,
    stateDir: tunText(v.stateDir, 'stateDir', DEFAULT_TUN_STATE_DIR),
  };
}

const HASHES = ['BLAKE2s', 'SHA256', 'BLAKE2b', 'SHA512'] as const;
/** setTimeout's limit: a longer delay fires at once. */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** A rate above this is no limit at all (a million X25519s a second is more than a machine does). */
const MAX_PER_SECOND = 1_000_000;

function normalizePluginRef(value: unknown, text: string | undefined): ResolvedPluginRef {
  if (typeof value === 'string' && value.trim() !== '') return { use: value.trim(), options: {} };
  if (text !== undefined && (typeof value === 'number' || typeof value === 'boolean')) {
    return { use: text.trim(), options: {} };
  }
  if (isPlainObject(value)) {
    const { use, ...options } = value;
    if (typeof use === 'string' && use.trim() !== '') return { use: use.trim(), options: copyData(options) };
    throw new Problem(`expected { use: "name", ...options }: "use" must name the plugin, got ${describe(use)}`);
  }
  throw new Problem(`expected a plugin name, a path, or { use: "name", ...options }, got ${describe(value)}`);
}

function normalizeClients(value: unknown): ClientEntry[] {
  if (!Array.isArray(value)) throw new Problem(`expected a list of { name, publicKey }, got ${describe(value)}`);
  const names = new Set<string>();
  return value.map((item, i) => {
    const at = `[${i}]`;
    if (!isPlainObject(item)) throw new Problem(`expected { name, publicKey }, got ${describe(item)}`, ErrorCodes.CONFIG, at);
    for (const field of Object.keys(item)) {
      if (field !== 'name' && field !== 'publicKey') {
        throw new Problem(`unknown field "${field}"${suggestFrom(field, ['name', 'publicKey'])} (an entry is { name, publicKey })`, ErrorCodes.CONFIG, at);
      }
    }
    const { name, publicKey } = item;
    if (typeof name !== 'string' || name.trim() === '') {
      throw new Problem(`"name" must be a non-empty string, got ${describe(name)}`, ErrorCodes.CONFIG, at);
    }
    if (names.has(name)) throw new Problem(`duplicate client name "${name}"`, ErrorCodes.CONFIG, at);
    names.add(name);
    if (typeof publicKey !== 'string' || publicKey.trim() === '') {
      throw new Problem(
        `"publicKey" must be the client's public key (base64) or the path of its .pub file, got ${describe(publicKey)}`,
        ErrorCodes.CONFIG,
        at,
      );
    }
    let key = publicKey.trim();
    if (isInlineKey(key)) {
      try {
        key = encodeKey(decodeKey(key, 'x'));
      } catch {
        throw new Problem('not a public key (expected base64 of 32 bytes, or the path of a .pub file)', ErrorCodes.KEY, `${at}.publicKey`);
      }
    }
    return { name, publicKey: key };
  });
}

/** "host:port" (parseHostPort's checks), returned trimmed. */
function checkHostPort(value: string, what?: string): string {
  try {
    parseHostPort(value, what ?? 'x');
  } catch (err) {
    if (!isDshieldError(err)) throw err;
    if (what !== undefined) throw err;
    // parseHostPort prefixes `what`; the caller adds the key path itself.
    throw new Problem(err.message.replace(/^x: /, ''));
  }
  return value.trim();
}

/** "host:port", or a ws:// / wss:// URL (for the ws transport). */
function checkServerAddress(value: string): string {
  const v = value.trim();
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(v)) {
    let url: URL;
    try {
      url = new URL(v);
    } catch {
      throw new Problem(`${JSON.stringify(v)} is not a valid URL`);
    }
    if (url.protocol !== 'ws:' && url.protocol !== 'wss:') {
      throw new Problem(`expected "host:port" or a ws:// or wss:// URL, got ${JSON.stringify(v)}`);
    }
    if (url.hostname === '') throw new Problem(`${JSON.stringify(v)} has no host`);
    return v;
  }
  return checkHostPort(v);
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return false;
  const proto = Object.getPrototypeOf(value) as unknown;
  return proto === Object.prototype || proto === null;
}

/** A value for a message: short, and never a secret when `secret`. */
function describe(value: unknown, secret = false): string {
  if (value === undefined) return 'nothing';
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'a list';
  if (typeof value === 'object') return 'an object';
  if (secret) return typeof value === 'string' ? 'a string' : `a ${typeof value}`;
  if (typeof value === 'string') {
    return value.length > 60 ? JSON.stringify(value.slice(0, 57) + '...') : JSON.stringify(value);
  }
  return String(value);
}

function configError(message: string, cause?: unknown): DshieldError {
  return new DshieldError(ErrorCodes.CONFIG, message, cause === undefined ? undefined : { cause });
}

function firstLine(err: unknown): string {
  const msg = err instanceof Error ? err.message : String(err);
  return msg.split('\n').find((l) => l.trim() !== '')?.trim() ?? msg;
}

// ---------------------------------------------------------------------------
// Suggestions

function editDistance(a: string, b: string): number {
  const prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let diag = prev[0]!;
    prev[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const up = prev[j]!;
      prev[j] = Math.min(up + 1, prev[j - 1]! + 1, diag + (a[i - 1] === b[j - 1] ? 0 : 1));
      diag = up;
    }
  }
  return prev[b.length]!;
}

/** The candidate closest to `wrong` (case-insensitively), if it is close enough to be a typo. */
function closest(wrong: string, candidates: readonly string[]): string | undefined {
  const w = wrong.toLowerCase();
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const c of candidates) {
    const d = editDistance(w, c.toLowerCase());
    if (d < bestDistance) {
      best = c;
      bestDistance = d;
    }
  }
  return bestDistance <= Math.max(2, Math.floor(w.length / 4)) ? best : undefined;
}

function suggestFrom(wrong: string, candidates: readonly string[]): string {
  const hit = closest(wrong, candidates);
  return hit ? ` (did you mean "${hit}"?)` : '';
}

/** " (did you mean "server.listen"?)" for a mistyped path, or "". */
function suggestKey(path: string[]): string {
  const all = listConfigKeys();
  const wrong = path.join('.');
  const hit = closest(wrong, all);
  if (hit) return ` (did you mean "${hit}"?)`;
  // The right name at the wrong level: "listen" at the top is "server.listen".
  const last = path[path.length - 1]!.toLowerCase();
  const moved = all.filter((k) => k.split('.').pop()!.toLowerCase() === last);
  return moved.length > 0 ? ` (did you mean ${moved.map((k) => `"${k}"`).join(' or ')}?)` : '';
}

function suggestOverride(segments: string[], origin: Origin): string {
  const all = listConfigKeys();
  if (origin.kind === 'env') {
    const asEnv = (k: string) => ENV_PREFIX + k.split('.').join('__').toUpperCase();
    const hit = closest(ENV_PREFIX + segments.join('__'), all.map(asEnv));
    return hit ? ` (did you mean ${hit}?)` : '';
  }
  const hit = closest(segments.join('.'), all);
  return hit ? ` (did you mean ${hit}?)` : '';
}

// ---------------------------------------------------------------------------
// Keys and the clients file

/** Adds the entries `dshield invite` wrote to server.clientsFile, if it exists. */
function mergeClientsFile(config: ResolvedConfig): void {
  const entries = readClientsFile(config.server.clientsFile);
  for (const entry of entries) {
    if (config.server.clients.some((c) => c.name === entry.name)) {
      throw configError(`server.clients: "${entry.name}" is listed in the config and again in ${config.server.clientsFile}; remove one`);
    }
  }
  config.server.clients = [...config.server.clients, ...entries];
}

/**
 * The entries of a clients file (`dshield invite` writes it): [] when it does
 * not exist; DshieldError(CONFIG or KEY) naming the file when it is malformed.
 */
export function readClientsFile(file: string): ClientEntry[] {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as { code?: string }).code === 'ENOENT') return [];
    throw configError(`server.clientsFile: cannot read ${file} (${(err as { code?: string }).code ?? firstLine(err)})`);
  }
  let parsed: unknown;
  try {
    parsed = text.trim() === '' ? [] : JSON.parse(text);
  } catch (err) {
    throw configError(`server.clientsFile: ${file} is not valid JSON (${firstLine(err)})`);
  }
  let entries: ClientEntry[];
  try {
    entries = normalizeClients(parsed);
  } catch (err) {
    if (err instanceof Problem) throw new DshieldError(err.code, `server.clientsFile: ${file}${err.at}: ${err.message}`);
    throw err;
  }
  for (const [i, entry] of entries.entries()) {
    if (!isInlineKey(entry.publicKey)) {
      throw new DshieldError(ErrorCodes.KEY, `server.clientsFile: ${file}[${i}] "${entry.name}": publicKey must be base64 of 32 bytes`);
    }
  }
  return entries;
}

function keyError(what: string, message: string, sources: Map<string, Origin>, sourceKey = what): DshieldError {
  return new DshieldError(ErrorCodes.KEY, `${what}: ${message}${originText(sources.get(sourceKey))}`);
}

/** Reads a key field, or creates the pair when it is a path to a missing file. */
function materializePrivateKey(ref: string, what: string, baseDir: string, sources: Map<string, Origin>, log?: Logger): string {
  if (isInlineKey(ref)) return ref;
  try {
    const { keyPair, created } = ensureKeyPair(resolve(baseDir, ref), what);
    if (created) log?.info(`created a new key pair for ${what}: ${ref} (private, mode 0600) and its .pub file`);
    return encodeKey(keyPair.privateKey);
  } catch (err) {
    throw withOrigin(err, sources.get(what) ?? { kind: 'default' });
  }
}

function materializeServerKeys(config: ResolvedConfig, sources: Map<string, Origin>, log?: Logger): void {
  const { baseDir } = config;
  config.server.privateKey = materializePrivateKey(config.server.privateKey, 'server.privateKey', baseDir, sources, log);
  config.server.clients = config.server.clients.map((entry, i) => {
    const what = `server.clients[${i}] "${entry.name}" publicKey`;
    if (isInlineKey(entry.publicKey)) return entry;
    const file = resolve(baseDir, entry.publicKey);
    if (!existsSync(file)) {
      // The shipped config names keys/client.pub: on a first run on one machine
      // the local client's key pair does not exist yet, so make it.
      const privateFile = privateKeyPathFor(file);
      if (privateFile === undefined) {
        throw keyError(what, `${entry.publicKey} does not exist`, sources, 'server.clients');
      }
      const { keyPair, created } = ensureKeyPair(privateFile, what);
      if (created) log?.info(`created a new key pair for client "${entry.name}": ${privateFile} and ${entry.publicKey}`);
      return { name: entry.name, publicKey: encodeKey(keyPair.publicKey) };
    }
    try {
      return { name: entry.name, publicKey: encodeKey(readKeyRef(entry.publicKey, baseDir, what)) };
    } catch (err) {
      throw withOrigin(err, sources.get('server.clients') ?? { kind: 'default' });
    }
  });
}

function materializeClientKeys(config: ResolvedConfig, sources: Map<string, Origin>, log?: Logger): void {
  const { baseDir } = config;
  config.client.privateKey = materializePrivateKey(config.client.privateKey, 'client.privateKey', baseDir, sources, log);
  const ref = config.client.serverPublicKey;
  if (isInlineKey(ref)) return;
  if (!existsSync(resolve(baseDir, ref))) {
    throw new DshieldError(
      ErrorCodes.KEY,
      `client.serverPublicKey: ${ref} does not exist: start the server once on this machine to create it, or set the server's public key`,
    );
  }
  try {
    config.client.serverPublicKey = encodeKey(readKeyRef(ref, baseDir, 'client.serverPublicKey'));
  } catch (err) {
    throw withOrigin(err, sources.get('client.serverPublicKey') ?? { kind: 'default' });
  }
}

/** Two names for one key would make the server's choice of identity arbitrary. */
function checkDistinctClientKeys(config: ResolvedConfig): void {
  const byKey = new Map<string, string>();
  for (const { name, publicKey } of config.server.clients) {
    if (!isInlineKey(publicKey)) continue;
    const other = byKey.get(publicKey);
    if (other !== undefined) {
      throw new DshieldError(ErrorCodes.KEY, `server.clients: "${other}" and "${name}" have the same public key; each client needs its own key`);
    }
    byKey.set(publicKey, name);
  }
}

/**
 * From a plugin ref in the config to a running plugin instance.
 *
 * A short name ("ws") means the built-in file plugins/<kind>-<name>.ts: the
 * catalogue is whatever `ls plugins/` shows. A ref that looks like a path
 * ("./my-transport.ts", "plugins/x.js") is a user's plugin file, relative to
 * the config file's directory. Either way the file's default export is
 * checked (checkPluginDefinition), the user's options are checked against the
 * plugin's schema and completed with defaults, and `create` runs with a
 * context whose logger is scoped "kind:name". Every failure is one
 * DshieldError line naming the plugin (and the option).
 */
import { existsSync, readdirSync, statSync } from 'node:fs';
import { resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { checkPluginDefinition, PLUGIN_KINDS } from './define.ts';
import { DshieldError, ErrorCodes, wrapPluginError } from './errors.ts';
import type { EventBus } from './events.ts';
import { isSecretName } from './keys.ts';
import { rescopeLogger } from './log.ts';
import type {
  Logger,
  Mode,
  OptionSpec,
  OptionsSchema,
  PluginContext,
  PluginDefinition,
  PluginInstanceMap,
  PluginKind,
  ResolvedConfig,
  ResolvedPluginRef,
} from './types.ts';

const PLUGINS_DIR = fileURLToPath(new URL('../plugins/', import.meta.url));

/** What the core gives every plugin it loads; the registry adds the scoped logger. */
export interface PluginContextBase {
  mode: Mode;
  events: EventBus;
  signal: AbortSignal;
  config: ResolvedConfig;
  baseDir: string;
  /** The registry hands the plugin a logger with the same sinks, scoped "kind:name". */
  log: Logger;
}

export interface LoadedPlugin<K extends PluginKind> {
  def: PluginDefinition<K>;
  instance: PluginInstanceMap[K];
}

/** The built-in plugin names per kind, from the files in plugins/, sorted. */
export function listBuiltins(): Record<PluginKind, string[]> {
  const out = Object.fromEntries(PLUGIN_KINDS.map((k) => [k, [] as string[]])) as Record<PluginKind, string[]>;
  let files: string[];
  try {
    files = readdirSync(PLUGINS_DIR);
  } catch {
    return out;
  }
  for (const file of files.sort()) {
    const match = /^([a-z]+)-(.+)\.ts$/.exec(file);
    if (!match || file.endsWith('.d.ts') || file.endsWith('.test.ts')) continue;
    const kind = match[1] as PluginKind;
    if (PLUGIN_KINDS.includes(kind)) out[kind].push(match[2]!);
  }
  return out;
}

/** True when a ref names a file rather than a built-in: it has a "/", starts with "." or ends in .ts/.js. */
export function isPluginPath(use: string): boolean {
  return use.includes('/') || use.includes('\\') || use.startsWith('.') || /\.(c|m)?(t|j)s$/.test(use);
}

/**
 * The file a ref names. Throws DshieldError(PLUGIN) for an unknown short
 * name (listing the built-ins) or a path that does not exist.
 */
export function resolvePluginFile(kind: PluginKind, use: string, baseDir: string): string {
  if (isPluginPath(use)) {
    const file = resolve(baseDir, use);
    if (!existsSync(file) || !statSync(file).isFile()) {
      throw new DshieldError(ErrorCodes.PLUGIN, `${kind} plugin "${use}": file not found (looked for ${file})`);
    }
    return file;
  }
  const builtins = listBuiltins()[kind];
  if (!builtins.includes(use)) {
    const hint = builtins.find((b) => b.toLowerCase() === use.toLowerCase());
    throw new DshieldError(
      ErrorCodes.PLUGIN,
      `unknown ${kind} plugin "${use}" (built-in: ${builtins.join(', ') || 'none'})` +
        (hint ? `; did you mean "${hint}"?` : `; to use your own, give a path like ./my-${kind}.ts`),
    );
  }
  return resolve(PLUGINS_DIR, `${kind}-${use}.ts`);
}

/**
 * Imports and checks one plugin without creating it (what `dshield check`
 * does): the file, its default export, its mode and its options. Returns the
 * definition and the options completed with defaults.
 */
export async function inspectPlugin<K extends PluginKind>(
  kind: K,
  ref: ResolvedPluginRef,
  baseDir: string,
  mode: Mode,
): Promise<{ def: PluginDefinition<K>; options: Record<string, unknown>; file: string }> {
  const file = resolvePluginFile(kind, ref.use, baseDir);
  const where = `${kind} plugin "${ref.use}"`;
  let mod: { default?: unknown };
  try {
    mod = (await import(pathToFileURL(file).href)) as { default?: unknown };
  } catch (err) {
    const msg = err instanceof Error ? err.message : String(err);
    throw new DshieldError(ErrorCodes.PLUGIN, `${where}: cannot load ${file}: ${msg.split('\n')[0]}`, { cause: err });
  }
  const def = checkPluginDefinition(mod.default, kind, where);
  const label = `${kind} plugin "${def.name}"`;
  if (def.modes && !def.modes.includes(mode)) {
    throw new DshieldError(ErrorCodes.PLUGIN, `${label} runs only in ${def.modes.join(' or ')} mode, not in ${mode} mode`);
  }
  return { def, options: checkOptions(label, def.options, ref.options), file };
}

/**
 * Imports, checks and creates one plugin. Throws DshieldError(PLUGIN) (or the
 * plugin's own DshieldError code, prefixed with its name) for: an unknown
 * name or missing file, a file that fails to import, a wrong default export,
 * a plugin of another kind or mode, an unknown, mistyped or missing option,
 * and any error thrown by `create`.
 */
export async function loadPlugin<K extends PluginKind>(
  kind: K,
  ref: ResolvedPluginRef,
  ctxBase: PluginContextBase,
): Promise<LoadedPlugin<K>> {
  const { def, options } = await inspectPlugin(kind, ref, ctxBase.baseDir, ctxBase.mode);
  const label = `${kind} plugin "${def.name}"`;
  const ctx: PluginContext = {
    mode: ctxBase.mode,
    log: rescopeLogger(ctxBase.log, `${kind}:${def.name}`),
    events: ctxBase.events,
    signal: ctxBase.signal,
    config: ctxBase.config,
    baseDir: ctxBase.baseDir,
  };
  let instance: PluginInstanceMap[K];
  try {
    instance = await def.create(options, ctx);
  } catch (err) {
    throw wrapPluginError(def.name, kind, err);
  }
  checkInstance(kind, label, instance);
  return { def, instance };
}

/**
 * `given` checked against `schema` and completed with defaults (a fresh copy;
 * `given` is not changed). Option names match case-insensitively when there
 * is no exact match (environment variables arrive in one case), and such a
 * match overrides an exact one. Throws DshieldError(PLUGIN) naming the option.
 */
export function checkOptions(
  label: string,
  schema: OptionsSchema | undefined,
  given: Record<string, unknown>,
): Record<string, unknown> {
  const specs = schema ?? {};
  const names = Object.keys(specs);
  const fail = (why: string): never => {
    throw new DshieldError(ErrorCodes.PLUGIN, `${label}: ${why}`);
  };

  const exact: Record<string, unknown> = {};
  const folded: Record<string, unknown> = {};
  for (const [name, value] of Object.entries(given)) {
    if (Object.hasOwn(specs, name)) {
      exact[name] = value;
      continue;
    }
    const match = names.filter((n) => n.toLowerCase() === name.toLowerCase());
    if (match.length === 1) {
      folded[match[0]!] = value;
      continue;
    }
    fail(`unknown option "${name}" (${names.length > 0 ? `it takes: ${names.join(', ')}` : 'it takes no options'})`);
  }
  const merged = { ...exact, ...folded };

  const out: Record<string, unknown> = {};
  for (const [name, spec] of Object.entries(specs)) {
    let value = merged[name];
    if (value === undefined) {
      if (spec.default !== undefined) out[name] = copyDefault(spec.default);
      else if (spec.required) fail(`option "${name}" is required: ${spec.description}`);
      continue;
    }
    value = coerce(spec, value);
    const typeProblem = checkType(spec, value);
    if (typeProblem) fail(`option "${name}" must be ${typeProblem}, got ${describeOption(name, value)}`);
    let problem: string | undefined;
    try {
      problem = spec.validate?.(value);
    } catch (err) {
      problem = err instanceof Error ? err.message : String(err);
    }
    if (problem) fail(`option "${name}" ${problem}`);
    out[name] = value;
  }
  return out;
}

/** A number or boolean where a string is wanted came from the environment as text ("8080"). */
function coerce(spec: OptionSpec, value: unknown): unknown {
  if (spec.type === 'string' && (typeof value === 'number' || typeof value === 'boolean')) return String(value);
  return value;
}

function checkType(spec: OptionSpec, value: unknown): string | undefined {
  switch (spec.type) {
    case 'string':
      return typeof value === 'string' ? undefined : 'a string';
    case 'number':
      return typeof value === 'number' && Number.isFinite(value) ? undefined : 'a number';
    case 'boolean':
      return typeof value === 'boolean' ? undefined : 'true or false';
    case 'string[]':
      return Array.isArray(value) && value.every((v) => typeof v === 'string') ? undefined : 'a list of strings';
    case 'object':
      return value !== null && typeof value === 'object' && !Array.isArray(value) ? undefined : 'an object';
    case 'any':
      return undefined;
  }
}

function describeOption(name: string, value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'a list';
  if (typeof value === 'object') return 'an object';
  if (isSecretName(name)) return `a ${typeof value}`;
  if (typeof value === 'string') return JSON.stringify(value.length > 60 ? value.slice(0, 57) + '...' : value);
  return String(value);
}

/** Defaults are shared by every load: hand out copies of lists and objects. */
function copyDefault(value: unknown): unknown {
  if (value === null || typeof value !== 'object') return value;
  try {
    return structuredClone(value);
  } catch {
    return value;
  }
}

const REQUIRED_METHODS: Record<PluginKind, string[]> = {
  transport: ['listen', 'dial'],
  cipher: ['encrypt', 'decrypt'],
  auth: ['authorize', 'psk'],
  logger: ['log'],
  inbound: ['start'],
  outbound: ['connect', 'udp'],
};

/** A `create` that returns the wrong thing fails here, naming the plugin, not later in the data path. */
function checkInstance(kind: PluginKind, label: string, instance: unknown): void {
  if (instance === null || typeof instance !== 'object') {
    throw new DshieldError(ErrorCodes.PLUGIN, `${label}: create() must return the ${kind} object, got ${instance === null ? 'null' : typeof instance}`);
  }
  // A datagram transport binds an endpoint instead of listening and dialing.
  const required =
    kind === 'transport' && (instance as { type?: unknown }).type === 'datagram' ? ['bind'] : REQUIRED_METHODS[kind];
  const missing = required.filter((m) => typeof (instance as Record<string, unknown>)[m] !== 'function');
  if (missing.length > 0) {
    throw new DshieldError(ErrorCodes.PLUGIN, `${label}: create() returned an object without ${missing.join(', ')}(): not a ${kind} plugin instance`);
  }
}

/**
 * The core's Logger: builds LogRecords and hands each to every logger plugin
 * (the sinks). Logging never throws and never crashes the process: a sink
 * that throws is skipped for that record.
 *
 * Each logger plugin filters by its own level. So that a debug call on a busy
 * path costs almost nothing when no sink wants debug, a sink may expose
 * `minLevel` (the lowest level it keeps); a sink without it is assumed to
 * want everything.
 */
import { isSecretName } from './keys.ts';
import type { LogLevel, LogRecord, Logger, LoggerPlugin } from './types.ts';

const LEVEL_RANK: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export const LOG_LEVELS: readonly LogLevel[] = ['debug', 'info', 'warn', 'error'];

/** A logger plugin that may say which levels it keeps. */
type LeveledSink = LoggerPlugin & { readonly minLevel?: LogLevel };

/** Marks loggers made here, so a plugin's logger can be scoped exactly "kind:name". */
const SINKS = Symbol('dshield.logSinks');

interface CoreLogger extends Logger {
  readonly [SINKS]: { sinks: readonly LoggerPlugin[]; minLevel: LogLevel | undefined };
}

/**
 * A Logger with `scope` that fans out to `sinks`. The array is read on every
 * call, so sinks pushed into it later (logger plugins load after the core's
 * logger exists) receive records from then on. Records below `minLevel` are
 * dropped here; without it, each sink's own filter decides.
 * `child("x")` is scoped "scope:x" (just "x" when scope is empty).
 * Fields whose names look secret (privateKey, psk, token...) are replaced by
 * "<redacted>" before any sink sees them.
 */
export function createLogger(sinks: readonly LoggerPlugin[], scope: string, minLevel?: LogLevel): Logger {
  const floor = minLevel === undefined ? 0 : LEVEL_RANK[minLevel];

  const wanted = (level: LogLevel): boolean => {
    const rank = LEVEL_RANK[level];
    if (rank < floor) return false;
    for (const sink of sinks as readonly LeveledSink[]) {
      const min = sink.minLevel;
      if (min === undefined || rank >= (LEVEL_RANK[min] ?? 0)) return true;
    }
    return false;
  };

  const emit = (level: LogLevel, msg: string, fields?: Record<string, unknown>): void => {
    if (!wanted(level)) return;
    const record: LogRecord = { time: Date.now(), level, scope, msg: String(msg) };
    if (fields !== undefined) record.fields = scrubFields(fields);
    for (const sink of sinks) {
      try {
        sink.log(record);
      } catch {
        // A broken sink must not take the process (or the other sinks) down.
      }
    }
  };

  const logger: CoreLogger = {
    [SINKS]: { sinks, minLevel },
    debug: (msg, fields) => emit('debug', msg, fields),
    info: (msg, fields) => emit('info', msg, fields),
    warn: (msg, fields) => emit('warn', msg, fields),
    error: (msg, fields) => emit('error', msg, fields),
    child: (sub) => createLogger(sinks, scope === '' ? sub : `${scope}:${sub}`, minLevel),
  };
  return logger;
}

/**
 * A logger scoped exactly `scope` (not nested under `parent`'s scope) that
 * writes where `parent` writes. Plugins get "kind:name" this way. For a
 * Logger not made by createLogger it falls back to `parent.child(scope)`.
 */
export function rescopeLogger(parent: Logger, scope: string): Logger {
  const own = (parent as Partial<CoreLogger>)[SINKS];
  return own ? createLogger(own.sinks, scope, own.minLevel) : parent.child(scope);
}

function scrubFields(fields: Record<string, unknown>): Record<string, unknown> {
  let out: Record<string, unknown> | undefined;
  for (const name of Object.keys(fields)) {
    if (isSecretName(name)) {
      out ??= { ...fields };
      out[name] = '<redacted>';
    }
  }
  return out ?? fields;
}

/** One line for a human: `warn  scope: message key=value ...`. */
export function formatRecordLine(record: LogRecord): string {
  let line = `${record.level.padEnd(5)} ${record.scope ? record.scope + ': ' : ''}${record.msg}`;
  if (record.fields) {
    for (const [name, value] of Object.entries(record.fields)) {
      if (value === undefined) continue;
      line += ` ${name}=${typeof value === 'string' ? value : safeJson(value)}`;
    }
  }
  return line;
}

function safeJson(value: unknown): string {
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}

/**
 * The logger used before the logger plugins are loaded (config loading,
 * plugin loading): warnings and errors go to stderr as one line each, the
 * rest is dropped. `write` replaces stderr (tests).
 */
export function bootstrapLogger(
  scope = 'dshield',
  opts: { minLevel?: LogLevel; write?: (line: string) => void } = {},
): Logger {
  const write = opts.write ?? ((line: string) => process.stderr.write(line + '\n'));
  const min = opts.minLevel ?? 'warn';
  const sink: LeveledSink = {
    name: 'bootstrap',
    minLevel: min,
    log(record) {
      if (LEVEL_RANK[record.level] >= LEVEL_RANK[min]) write(formatRecordLine(record));
    },
  };
  return createLogger([sink], scope, min);
}

/**
 * logger console: one human-readable line per record on stderr (or stdout).
 *
 *   14:03:07.512 INFO  [server] session up: alice from 127.0.0.1:50312 client=alice
 *
 * Values that could break the line or drive the terminal (newlines, escape
 * sequences from a hostile host name) are escaped; secret-named fields are
 * redacted even though callers must not log them.
 */
import chalk, { Chalk, chalkStderr, type ChalkInstance } from 'chalk';
import { definePlugin } from '../core/define.ts';
import { DshieldError, ErrorCodes } from '../core/errors.ts';
import {
  DEFAULT_LIMITS,
  LOG_LEVELS,
  escapeControls,
  isLogLevel,
  levelAtLeast,
  safeFields,
  truncate,
} from '../core/log-format.ts';
import type { LogLevel, LoggerPlugin, LogRecord } from '../core/types.ts';

/** Where lines go. Anything with write() works (the tests pass a capture stream). */
interface LineSink {
  write(chunk: string): unknown;
  on?(event: 'error', listener: (err: Error) => void): unknown;
  off?(event: 'error', listener: (err: Error) => void): unknown;
}

export interface ConsoleLoggerOptions {
  level?: LogLevel;
  color?: boolean;
  stream?: 'stderr' | 'stdout' | LineSink;
}

/** The instance, with the minimum level so the core can skip building records nobody wants. */
export interface ConsoleLogger extends LoggerPlugin {
  readonly minLevel: LogLevel;
}

/** A terminal line stays readable; the file logger keeps longer values. */
const LIMITS = { ...DEFAULT_LIMITS, maxString: 1000 };
const MAX_MESSAGE = 4000;

const LEVEL_LABEL: Record<LogLevel, string> = { debug: 'DEBUG', info: 'INFO ', warn: 'WARN ', error: 'ERROR' };

function isLineSink(value: unknown): value is LineSink {
  return typeof value === 'object' && value !== null && typeof (value as LineSink).write === 'function';
}

function validateStream(value: unknown): string | undefined {
  if (value === 'stderr' || value === 'stdout' || isLineSink(value)) return undefined;
  return `must be "stderr" or "stdout" (got ${JSON.stringify(value)})`;
}

function validateLevel(value: unknown): string | undefined {
  return isLogLevel(value) ? undefined : `must be one of ${LOG_LEVELS.join(', ')} (got ${JSON.stringify(value)})`;
}

function two(n: number): string {
  return n < 10 ? `0${n}` : String(n);
}

/** HH:MM:SS.mmm in local time: a console reader compares it with their clock. */
function clockTime(ms: number): string {
  const d = new Date(Number.isFinite(ms) ? ms : Date.now());
  const millis = d.getMilliseconds();
  return `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}.${millis < 100 ? (millis < 10 ? '00' : '0') : ''}${millis}`;
}

/** A string value bare when it is one plain token, else quoted with escapes. */
function quoteIfNeeded(text: string): string {
  // eslint-disable-next-line no-control-regex
  if (text !== '' && !/[\s"=\\\u0000-\u001f\u007f-\u009f]/.test(text)) return text;
  return `"${escapeControls(text.replace(/\\/g, '\\\\').replace(/"/g, '\\"'))}"`;
}

function formatValue(value: unknown): string {
  if (typeof value === 'string') return quoteIfNeeded(value);
  if (value === null || typeof value !== 'object') return String(value);
  // JSON escapes C0 controls; escapeControls catches the C1 ones JSON leaves raw.
  return escapeControls(JSON.stringify(value));
}

function levelColor(c: ChalkInstance, level: LogLevel): (text: string) => string {
  switch (level) {
    case 'debug':
      return c.gray;
    case 'info':
      return c.cyan;
    case 'warn':
      return c.yellow;
    case 'error':
      return c.red.bold;
  }
}

export default definePlugin<'logger', ConsoleLoggerOptions>({
  kind: 'logger',
  name: 'console',
  description: 'human-readable lines on stderr, colored on a terminal',
  options: {
    level: {
      type: 'string',
      description: 'lowest level written: debug, info, warn or error',
      default: 'info',
      validate: validateLevel,
    },
    color: { type: 'boolean', description: 'color the output (default: when the stream is a color terminal)' },
    stream: { type: 'any', description: '"stderr" or "stdout"', default: 'stderr', validate: validateStream },
  },
  create(options): ConsoleLogger {
    const minLevel = options.level ?? 'info';
    const levelProblem = validateLevel(minLevel);
    if (levelProblem) throw new DshieldError(ErrorCodes.CONFIG, `option "level" ${levelProblem}`);
    const streamOption = options.stream ?? 'stderr';
    const streamProblem = validateStream(streamOption);
    if (streamProblem) throw new DshieldError(ErrorCodes.CONFIG, `option "stream" ${streamProblem}`);
    if (options.color !== undefined && typeof options.color !== 'boolean') {
      throw new DshieldError(ErrorCodes.CONFIG, 'option "color" must be true or false');
    }

    const out: LineSink =
      streamOption === 'stderr' ? process.stderr : streamOption === 'stdout' ? process.stdout : streamOption;
    // chalk detects color support per standard stream; a custom sink gets none unless asked.
    const detected = streamOption === 'stderr' ? chalkStderr.level : streamOption === 'stdout' ? chalk.level : 0;
    const level = options.color === undefined ? detected : options.color ? Math.max(detected, 1) : 0;
    const c = new Chalk({ level: level as 0 | 1 | 2 | 3 });

    // A closed pipe (`dshield ... | head`) must not crash the process through
    // an unhandled 'error': the logger goes quiet instead.
    let broken = false;
    let closed = false;
    const onError = (): void => {
      broken = true;
    };
    out.on?.('error', onError);

    const format = (record: LogRecord): string => {
      const recordLevel = isLogLevel(record.level) ? record.level : 'error';
      const scope = escapeControls(String(record.scope ?? ''));
      const msg = escapeControls(truncate(String(record.msg ?? ''), MAX_MESSAGE));
      let line = `${c.dim(clockTime(record.time))} ${levelColor(c, recordLevel)(LEVEL_LABEL[recordLevel])} ${c.magenta(`[${scope}]`)} ${msg}`;
      const fields = safeFields(record.fields, LIMITS);
      for (const key of Object.keys(fields)) {
        line += ` ${c.gray(`${escapeControls(key)}=`)}${formatValue(fields[key])}`;
      }
      return line + '\n';
    };

    return {
      name: 'console',
      minLevel,
      log(record: LogRecord): void {
        if (closed || broken) return;
        try {
          if (!levelAtLeast(record.level, minLevel)) return;
          out.write(format(record));
        } catch {
          // Never throw into the caller: a log line is not worth a crash.
        }
      },
      close(): void {
        if (closed) return;
        closed = true;
        out.off?.('error', onError);
      },
    };
  },
});

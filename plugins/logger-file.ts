/**
 * logger file: JSON lines in a size-rotated file.
 *
 *   {"time":"2025-01-02T03:04:05.678Z","level":"info","scope":"server","msg":"session up","client":"alice"}
 *
 * Rotation: when the next write would take dshield.log past maxBytes, the
 * files shift (dshield.log -> dshield.log.1 -> ... ) and the oldest is
 * dropped, so at most maxFiles files (the current one included) and about
 * maxFiles × maxBytes of disk are ever used.
 *
 * Writing: records are buffered in memory and written with one synchronous
 * write per batch: on a short timer, when the batch reaches 64 KiB, at once
 * for warn and error records (the ones wanted after a crash), and for every
 * record once shutdown has begun. A synchronous write of a batch to a local
 * file costs microseconds; a stream would lose what it still holds if the
 * process ends before it drains. close() writes everything left.
 *
 * Files are created mode 0600 and the directory 0700: logs name clients and
 * their addresses. Secret-named fields are redacted.
 */
import { closeSync, fstatSync, mkdirSync, openSync, renameSync, unlinkSync, writeSync } from 'node:fs';
import { basename, isAbsolute, join, resolve } from 'node:path';
import { definePlugin } from '../core/define.ts';
import { DshieldError, ErrorCodes } from '../core/errors.ts';
import {
  DEFAULT_LIMITS,
  LOG_LEVELS,
  isLogLevel,
  levelAtLeast,
  safeFields,
  truncate,
} from '../core/log-format.ts';
import type { LogLevel, LoggerPlugin, LogRecord } from '../core/types.ts';

export interface FileLoggerOptions {
  dir?: string;
  level?: LogLevel;
  file?: string;
  maxBytes?: number;
  maxFiles?: number;
}

/** The instance, with the minimum level so the core can skip building records nobody wants. */
export interface FileLogger extends LoggerPlugin {
  readonly minLevel: LogLevel;
}

const DEFAULTS = { dir: 'logs', level: 'info', file: 'dshield.log', maxBytes: 10 * 1024 * 1024, maxFiles: 5 } as const;

const LIMITS = { ...DEFAULT_LIMITS, maxString: 8192 };
const MAX_MESSAGE = 8192;
/** A line longer than this (many large fields) is replaced by its header alone. */
const MAX_LINE = 64 * 1024;
const FLUSH_BYTES = 64 * 1024;
const FLUSH_DELAY_MS = 100;
/** While the disk refuses writes, the buffer stops here and new lines are counted as dropped. */
const MAX_PENDING_BYTES = 4 * 1024 * 1024;
const RESERVED = new Set(['time', 'level', 'scope', 'msg']);

function validateLevel(value: unknown): string | undefined {
  return isLogLevel(value) ? undefined : `must be one of ${LOG_LEVELS.join(', ')} (got ${JSON.stringify(value)})`;
}

function validatePositiveInteger(value: unknown): string | undefined {
  return typeof value === 'number' && Number.isSafeInteger(value) && value > 0
    ? undefined
    : `must be a positive integer (got ${JSON.stringify(value)})`;
}

function validateFileName(value: unknown): string | undefined {
  return typeof value === 'string' && value !== '' && value !== '.' && value !== '..' && basename(value) === value
    ? undefined
    : `must be a plain file name, without a directory (got ${JSON.stringify(value)}); use "dir" for the directory`;
}

function validateDir(value: unknown): string | undefined {
  return typeof value === 'string' && value !== '' ? undefined : 'must be a non-empty path';
}

function optionError(name: string, problem: string | undefined): void {
  if (problem) throw new DshieldError(ErrorCodes.CONFIG, `option "${name}" ${problem}`);
}

/** One JSON line for a record; never throws, never longer than MAX_LINE (plus the header). */
function toJsonLine(record: LogRecord): string {
  const level = isLogLevel(record.level) ? record.level : 'error';
  const time = new Date(Number.isFinite(record.time) ? record.time : Date.now()).toISOString();
  const head = { time, level, scope: String(record.scope ?? ''), msg: truncate(String(record.msg ?? ''), MAX_MESSAGE) };
  const fields = safeFields(record.fields, LIMITS);
  const out: Record<string, unknown> = { ...head };
  for (const key of Object.keys(fields)) out[RESERVED.has(key) ? `_${key}` : key] = fields[key];
  const line = jsonWithoutRawControls(out);
  return line.length <= MAX_LINE ? line + '\n' : jsonWithoutRawControls({ ...head, truncated: true }) + '\n';
}

/**
 * JSON escapes C0 controls but leaves DEL, the C1 controls (one of them opens
 * a terminal escape sequence) and the Unicode line separators raw; escaping
 * them too keeps `tail -f` on the log safe from a hostile host name.
 */
function jsonWithoutRawControls(value: unknown): string {
  return JSON.stringify(value).replace(
    /[\u007f-\u009f\u2028\u2029]/g,
    (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`,
  );
}

/**
 * The log file and its rotated predecessors. Synchronous; every method
 * throws on a file system error and the caller decides what that costs.
 */
class RotatingFile {
  private fd: number | null = null;
  private size = 0;

  constructor(
    readonly path: string,
    private readonly maxBytes: number,
    private readonly maxFiles: number,
  ) {}

  open(): void {
    if (this.fd !== null) return;
    this.fd = openSync(this.path, 'a', 0o600);
    this.size = fstatSync(this.fd).size;
  }

  /** Appends whole lines, rotating between lines so no line is split across files. */
  writeLines(lines: readonly Buffer[]): void {
    this.open();
    let batch: Buffer[] = [];
    let batchBytes = 0;
    for (const line of lines) {
      if (this.size + batchBytes > 0 && this.size + batchBytes + line.length > this.maxBytes) {
        this.writeAll(batch, batchBytes);
        batch = [];
        batchBytes = 0;
        this.rotate();
      }
      batch.push(line);
      batchBytes += line.length;
    }
    this.writeAll(batch, batchBytes);
  }

  /** Never throws: a descriptor that will not close is forgotten all the same. */
  close(): void {
    if (this.fd === null) return;
    const fd = this.fd;
    this.fd = null;
    try {
      closeSync(fd);
    } catch {
      // EBADF/EIO: nothing more can be done with it.
    }
  }

  private writeAll(batch: Buffer[], bytes: number): void {
    if (bytes === 0 || this.fd === null) return;
    const data = batch.length === 1 ? batch[0]! : Buffer.concat(batch, bytes);
    let offset = 0;
    while (offset < data.length) offset += writeSync(this.fd, data, offset, data.length - offset);
    this.size += data.length;
  }

  private rotate(): void {
    this.close();
    // Files left by an earlier run with a larger maxFiles count against the limit too.
    for (let i = this.maxFiles; i < this.maxFiles + 100 && removeIfPresent(`${this.path}.${i}`); i++);
    for (let i = this.maxFiles - 1; i >= 1; i--) {
      renameIfPresent(i === 1 ? this.path : `${this.path}.${i - 1}`, `${this.path}.${i}`);
    }
    if (this.maxFiles === 1) removeIfPresent(this.path);
    this.open();
  }
}

function isMissing(err: unknown): boolean {
  return (err as NodeJS.ErrnoException)?.code === 'ENOENT';
}

function removeIfPresent(path: string): boolean {
  try {
    unlinkSync(path);
    return true;
  } catch (err) {
    if (isMissing(err)) return false;
    throw err;
  }
}

function renameIfPresent(from: string, to: string): void {
  try {
    renameSync(from, to);
  } catch (err) {
    if (!isMissing(err)) throw err;
  }
}

export default definePlugin<'logger', FileLoggerOptions>({
  kind: 'logger',
  name: 'file',
  description: 'JSON lines in a size-rotated file (logs/dshield.log)',
  options: {
    dir: {
      type: 'string',
      description: 'directory of the log files, relative to the config file',
      default: DEFAULTS.dir,
      validate: validateDir,
    },
    level: {
      type: 'string',
      description: 'lowest level written: debug, info, warn or error',
      default: DEFAULTS.level,
      validate: validateLevel,
    },
    file: { type: 'string', description: 'file name inside dir', default: DEFAULTS.file, validate: validateFileName },
    maxBytes: {
      type: 'number',
      description: 'rotate when the file would grow past this many bytes',
      default: DEFAULTS.maxBytes,
      validate: validatePositiveInteger,
    },
    maxFiles: {
      type: 'number',
      description: 'files kept, the current one included; the oldest is deleted',
      default: DEFAULTS.maxFiles,
      validate: validatePositiveInteger,
    },
  },
  create(options, ctx): FileLogger {
    const dirOption = options.dir ?? DEFAULTS.dir;
    const minLevel = options.level ?? DEFAULTS.level;
    const fileName = options.file ?? DEFAULTS.file;
    const maxBytes = options.maxBytes ?? DEFAULTS.maxBytes;
    const maxFiles = options.maxFiles ?? DEFAULTS.maxFiles;
    optionError('dir', validateDir(dirOption));
    optionError('level', validateLevel(minLevel));
    optionError('file', validateFileName(fileName));
    optionError('maxBytes', validatePositiveInteger(maxBytes));
    optionError('maxFiles', validatePositiveInteger(maxFiles));

    const dir = isAbsolute(dirOption) ? dirOption : resolve(ctx.baseDir, dirOption);
    const file = new RotatingFile(join(dir, fileName), maxBytes, maxFiles);
    try {
      mkdirSync(dir, { recursive: true, mode: 0o700 });
      file.open();
    } catch (err) {
      const why = (err as NodeJS.ErrnoException)?.code ?? String(err);
      throw new DshieldError(ErrorCodes.CONFIG, `cannot write log file ${file.path} (${why}); check option "dir"`, { cause: err });
    }

    let pending: Buffer[] = [];
    let pendingBytes = 0;
    let dropped = 0;
    let timer: NodeJS.Timeout | undefined;
    let shuttingDown = false;
    let closed = false;

    /** Writes everything buffered. Never throws (it also runs from a timer). */
    const flush = (): void => {
      if (timer) {
        clearTimeout(timer);
        timer = undefined;
      }
      if (pendingBytes === 0 && dropped === 0) return;
      const lines = pending;
      if (dropped > 0) {
        const note = toJsonLine({
          time: Date.now(),
          level: 'warn',
          scope: 'logger:file',
          msg: `${dropped} log lines were dropped: the log file could not be written`,
        });
        lines.unshift(Buffer.from(note));
      }
      try {
        file.writeLines(lines);
        pending = [];
        pendingBytes = 0;
        dropped = 0;
      } catch {
        // The disk refuses (full, removed, permissions): keep what is buffered
        // up to the bound, count the rest, and let the next flush try again.
        if (dropped > 0) lines.shift();
        file.close();
      }
    };

    const onAbort = (): void => {
      shuttingDown = true;
      flush();
    };
    ctx.signal.addEventListener('abort', onAbort, { once: true });
    if (ctx.signal.aborted) shuttingDown = true;

    return {
      name: 'file',
      minLevel,
      log(record: LogRecord): void {
        if (closed) return;
        try {
          if (!levelAtLeast(record.level, minLevel)) return;
          const line = Buffer.from(toJsonLine(record));
          if (pendingBytes + line.length > MAX_PENDING_BYTES) {
            dropped++;
            return;
          }
          pending.push(line);
          pendingBytes += line.length;
          if (shuttingDown || pendingBytes >= FLUSH_BYTES || record.level === 'warn' || record.level === 'error') {
            flush();
          } else if (!timer) {
            timer = setTimeout(flush, FLUSH_DELAY_MS);
            timer.unref();
          }
        } catch {
          // Never throw into the caller.
        }
      },
      close(): void {
        if (closed) return;
        closed = true;
        ctx.signal.removeEventListener('abort', onAbort);
        flush();
        file.close();
      },
    };
  },
});

/**
 * Compliance suite for logger plugins: every plugins/logger-*.ts file gets
 * the shared checks (levels, odd fields, one line per record, redaction,
 * close), then each built-in gets its own (format, stream, rotation...).
 * A new logger file fails the "covered" test until it has a harness here.
 */
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { checkPluginDefinition } from '../../core/define.ts';
import { DshieldError, ErrorCodes, isDshieldError } from '../../core/errors.ts';
import type { LogLevel, LoggerPlugin, LogRecord, PluginContext, PluginDefinition } from '../../core/types.ts';
import { testContext } from '../helpers/context.ts';
import { withTimeout } from '../helpers/timeout.ts';

const PLUGIN_DIR = fileURLToPath(new URL('../../plugins/', import.meta.url));
const loggerFiles = readdirSync(PLUGIN_DIR).filter((f) => /^logger-.+\.ts$/.test(f)).sort();

type LeveledLogger = LoggerPlugin & { readonly minLevel?: LogLevel };

/** One instance under test, with a way to read back what it wrote. */
interface Rig {
  logger: LeveledLogger;
  /** The lines written so far (for the file logger: after close()). */
  lines(): string[];
  /** Closes the logger and removes what it wrote. */
  cleanup(): void;
}

/** How to run one logger quietly and read its output. */
interface Harness {
  make(def: PluginDefinition<'logger'>, options?: Record<string, unknown>, ctx?: Partial<PluginContext>): Promise<Rig>;
}

function tempDir(): string {
  return mkdtempSync(join(tmpdir(), 'dshield-logger-'));
}

/** A Writable that keeps what it is given, to stand in for stderr. */
function captureStream(): { stream: Writable; text(): string } {
  const chunks: string[] = [];
  const stream = new Writable({
    decodeStrings: false,
    write(chunk, _enc, done) {
      chunks.push(String(chunk));
      done();
    },
  });
  return { stream, text: () => chunks.join('') };
}

function splitLines(text: string): string[] {
  return text.split('\n').filter((l) => l !== '');
}

const harnesses: Record<string, Harness> = {
  console: {
    async make(def, options = {}, ctx = {}) {
      const capture = captureStream();
      const logger = (await def.create({ stream: capture.stream, color: false, ...options }, testContext(ctx))) as LeveledLogger;
      return { logger, lines: () => splitLines(capture.text()), cleanup: () => {} };
    },
  },
  file: {
    async make(def, options = {}, ctx = {}) {
      // baseDir is a temp dir so the default options (dir "logs") are used as they are.
      const baseDir = tempDir();
      let logger: LeveledLogger;
      try {
        logger = (await def.create(options, testContext({ baseDir, ...ctx }))) as LeveledLogger;
      } catch (err) {
        rmSync(baseDir, { recursive: true, force: true });
        throw err;
      }
      const file = join(baseDir, String(options.dir ?? 'logs'), String(options.file ?? 'dshield.log'));
      return {
        logger,
        lines: () => {
          logger.close?.();
          return splitLines(readFileSync(file, 'utf8'));
        },
        cleanup: () => {
          logger.close?.();
          rmSync(baseDir, { recursive: true, force: true });
        },
      };
    },
  },
};

const definitions = new Map<string, PluginDefinition<'logger'>>();
for (const file of loggerFiles) {
  const mod = (await import(join(PLUGIN_DIR, file))) as { default: unknown };
  definitions.set(file, checkPluginDefinition(mod.default, 'logger', file));
}

function record(level: LogLevel, msg: string, fields?: Record<string, unknown>): LogRecord {
  return { time: Date.now(), level, scope: 'test', msg, ...(fields ? { fields } : {}) };
}

async function withRig(
  harness: Harness,
  def: PluginDefinition<'logger'>,
  options: Record<string, unknown>,
  body: (rig: Rig) => void | Promise<void>,
  ctx?: Partial<PluginContext>,
): Promise<void> {
  const rig = await harness.make(def, options, ctx);
  try {
    await body(rig);
  } finally {
    rig.cleanup();
  }
}

// ---------------------------------------------------------------------------
// Coverage: every logger file is a logger plugin with a harness.

const coverage = suite('logger plugins: coverage');

coverage('the built-in loggers are found', () => {
  assert.ok(loggerFiles.includes('logger-console.ts'), 'logger-console.ts found');
  assert.ok(loggerFiles.includes('logger-file.ts'), 'logger-file.ts found');
});

coverage('every logger-*.ts has a harness in this suite', () => {
  for (const [file, def] of definitions) {
    assert.is(`logger-${def.name}.ts`, file, `${file}: name matches the file name`);
    assert.ok(harnesses[def.name], `${file} has no harness in test/compliance/logger.test.ts: add one`);
  }
});

coverage.run();

// ---------------------------------------------------------------------------
// The shared checks, once per logger.

for (const [file, def] of definitions) {
  const harness = harnesses[def.name];
  if (!harness) continue;
  const t = suite(`logger compliance: ${file}`);

  t('declares its options with descriptions; level defaults to info', () => {
    assert.ok(def.options?.level, 'has a level option');
    assert.is(def.options!.level!.default, 'info');
    for (const [name, spec] of Object.entries(def.options ?? {})) {
      assert.ok(spec.description.length > 0, `option ${name} has a description`);
    }
  });

  t('defaults: minLevel info, debug dropped, info and above written', async () => {
    await withRig(harness, def, {}, (rig) => {
      assert.is(rig.logger.minLevel, 'info');
      rig.logger.log(record('debug', 'marker-debug'));
      rig.logger.log(record('info', 'marker-info'));
      rig.logger.log(record('warn', 'marker-warn'));
      rig.logger.log(record('error', 'marker-error'));
      const text = rig.lines().join('\n');
      assert.not.ok(text.includes('marker-debug'), 'debug filtered out');
      for (const m of ['marker-info', 'marker-warn', 'marker-error']) assert.ok(text.includes(m), `${m} written`);
    });
  });

  t("level 'warn': info filtered out, warn and error kept", async () => {
    await withRig(harness, def, { level: 'warn' }, (rig) => {
      assert.is(rig.logger.minLevel, 'warn');
      rig.logger.log(record('info', 'marker-info'));
      rig.logger.log(record('warn', 'marker-warn'));
      rig.logger.log(record('error', 'marker-error'));
      const lines = rig.lines();
      assert.is(lines.length, 2);
      assert.ok(lines[0]!.includes('marker-warn'));
      assert.ok(lines[1]!.includes('marker-error'));
    });
  });

  t("level 'debug': every level is written, one line per record", async () => {
    await withRig(harness, def, { level: 'debug' }, (rig) => {
      const levels: LogLevel[] = ['debug', 'info', 'warn', 'error'];
      for (const level of levels) rig.logger.log(record(level, `hello ${level}`, { n: 1 }));
      const lines = rig.lines();
      assert.is(lines.length, 4);
      levels.forEach((level, i) => assert.ok(lines[i]!.includes(`hello ${level}`)));
    });
  });

  t('a bad level option is refused with DshieldError(CONFIG)', async () => {
    try {
      await harness.make(def, { level: 'verbose' });
      assert.unreachable('created with level "verbose"');
    } catch (err) {
      assert.ok(isDshieldError(err, ErrorCodes.CONFIG), String(err));
      assert.match((err as Error).message, /level/);
    }
  });

  t('odd fields neither throw nor break the one-line-per-record rule', async () => {
    await withRig(harness, def, {}, (rig) => {
      const circular: Record<string, unknown> = { a: 1 };
      circular.self = circular;
      const throwing = {
        get boom(): never {
          throw new Error('getter');
        },
      };
      let deep: Record<string, unknown> = { leaf: true };
      for (let i = 0; i < 100; i++) deep = { deep };
      const odd: Record<string, unknown> = {
        circular,
        err: new DshieldError(ErrorCodes.DESTINATION, 'connection refused by peer'),
        plainErr: new Error('plain failure'),
        big: 123456789012345678901234567890n,
        missing: undefined,
        long: 'x'.repeat(1_000_000),
        sym: Symbol('s'),
        fn: function named() {},
        buf: Buffer.alloc(48, 7),
        nan: Number.NaN,
        when: new Date(0),
        bad: new Date(Number.NaN),
        throwing,
        deep,
        list: Array.from({ length: 10_000 }, (_, i) => i),
        nul: null,
        multiline: 'line one\nline two\r\n\u001b[31mred\u001b[0m \u009b2J',
        'key with space': 'v',
      };
      const many: Record<string, unknown> = {};
      for (let i = 0; i < 1000; i++) many[`k${i}`] = i;
      rig.logger.log(record('info', 'odd-1', odd));
      rig.logger.log(record('info', 'odd-2\nsecond line of the message', many));
      rig.logger.log(record('error', 'odd-3', undefined));
      rig.logger.log({ time: Number.NaN, level: 'info', scope: 'x\ny', msg: 'odd-4' });
      rig.logger.log({ time: Date.now(), level: 'nonsense' as LogLevel, scope: 's', msg: 'odd-5' });
      rig.logger.log({ time: Date.now(), level: 'info', scope: 's', msg: 42 as unknown as string, fields: null as never });
      const lines = rig.lines();
      assert.is(lines.length, 6, 'one line per record');
      assert.ok(lines[0]!.includes('connection refused by peer'), 'an Error field shows its message');
      assert.ok(lines[0]!.includes('123456789012345678901234567890'), 'a BigInt is written');
      assert.ok(lines[0]!.length < 100_000, `a long value is cut (line is ${lines[0]!.length} chars)`);
      assert.ok(lines[1]!.length < 100_000, `many fields are cut (line is ${lines[1]!.length} chars)`);
      for (const line of lines) {
        // eslint-disable-next-line no-control-regex
        assert.not.match(line, /[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/, 'no raw control characters');
      }
      assert.ok(lines[3]!.includes('odd-4'));
    });
  });

  t('secret-named fields are redacted at any depth', async () => {
    await withRig(harness, def, {}, (rig) => {
      rig.logger.log(
        record('info', 'with secrets', {
          privateKey: 'SECRET-A',
          psk: 'SECRET-B',
          password: 'SECRET-C',
          apiToken: 'SECRET-D',
          nested: { clientSecret: 'SECRET-E', ok: 'visible-value' },
          publicKey: 'public-value',
        }),
      );
      const text = rig.lines().join('\n');
      assert.not.match(text, /SECRET-/);
      assert.ok(text.includes('visible-value'));
      assert.ok(text.includes('public-value'), 'public keys are not secrets');
      assert.ok(text.includes('<redacted>'));
    });
  });

  t('close() is idempotent and records after it are dropped without throwing', async () => {
    await withRig(harness, def, {}, async (rig) => {
      rig.logger.log(record('info', 'before close'));
      await rig.logger.close?.();
      await rig.logger.close?.();
      rig.logger.log(record('error', 'after close'));
      const text = rig.lines().join('\n');
      assert.ok(text.includes('before close'), 'what was logged before close is written');
      assert.not.ok(text.includes('after close'));
    });
  });

  t.run();
}

// ---------------------------------------------------------------------------
// logger console

const consoleDef = definitions.get('logger-console.ts');
if (consoleDef) {
  const t = suite('logger console: specifics');
  const harness = harnesses.console!;

  t('the line format: time, level, scope, message, key=value fields', async () => {
    await withRig(harness, consoleDef, {}, (rig) => {
      rig.logger.log({
        time: new Date(2024, 0, 2, 3, 4, 5, 67).getTime(),
        level: 'warn',
        scope: 'server:session',
        msg: 'session up',
        fields: { client: 'alice', note: 'two words', n: 3, ok: true, err: new Error('it broke'), empty: '', q: 'a"b' },
      });
      const [line] = rig.lines();
      assert.is(
        line,
        '03:04:05.067 WARN  [server:session] session up client=alice note="two words" n=3 ok=true err="it broke" empty="" q="a\\"b"',
      );
    });
  });

  t('escape sequences in values cannot reach the terminal', async () => {
    await withRig(harness, consoleDef, {}, (rig) => {
      rig.logger.log(record('info', 'evil \u001b[2J msg', { host: 'a\u001b]0;title\u0007b' }));
      const [line] = rig.lines();
      assert.not.ok(line!.includes('\u001b'), 'no raw ESC');
      assert.ok(line!.includes('\\u001b'), 'ESC shown escaped');
    });
  });

  t('color: true colors the level, color: false writes plain text', async () => {
    await withRig(harness, consoleDef, { color: true }, (rig) => {
      rig.logger.log(record('error', 'colored'));
      assert.ok(rig.lines()[0]!.includes('\u001b['), 'has ANSI colors');
    });
    await withRig(harness, consoleDef, { color: false }, (rig) => {
      rig.logger.log(record('error', 'plain'));
      assert.not.ok(rig.lines()[0]!.includes('\u001b['), 'no ANSI colors');
    });
  });

  t('writes to stderr by default and to stdout when asked', async () => {
    const capture = (target: NodeJS.WriteStream, body: () => void): string => {
      const original = target.write;
      let written = '';
      target.write = ((chunk: unknown) => {
        written += String(chunk);
        return true;
      }) as typeof target.write;
      try {
        body();
      } finally {
        target.write = original;
      }
      return written;
    };
    const toStderr = (await consoleDef.create({ color: false }, testContext())) as LeveledLogger;
    const errText = capture(process.stderr, () => toStderr.log(record('info', 'to-stderr')));
    await toStderr.close?.();
    assert.ok(errText.includes('to-stderr'), 'default stream is stderr');

    const toStdout = (await consoleDef.create({ stream: 'stdout', color: false }, testContext())) as LeveledLogger;
    const outText = capture(process.stdout, () => toStdout.log(record('info', 'to-stdout')));
    await toStdout.close?.();
    assert.ok(outText.includes('to-stdout'), 'stream "stdout" writes to stdout');
  });

  t('a stream error (closed pipe) silences the logger instead of crashing; close removes its listener', async () => {
    const capture = captureStream();
    const before = capture.stream.listenerCount('error');
    const logger = (await consoleDef.create({ stream: capture.stream, color: false }, testContext())) as LeveledLogger;
    capture.stream.emit('error', Object.assign(new Error('write EPIPE'), { code: 'EPIPE' }));
    logger.log(record('info', 'after-epipe'));
    assert.not.ok(capture.text().includes('after-epipe'));
    await logger.close?.();
    assert.is(capture.stream.listenerCount('error'), before);
  });

  t('a bad stream option is refused', async () => {
    try {
      await consoleDef.create({ stream: 'tty' as never }, testContext());
      assert.unreachable('created with stream "tty"');
    } catch (err) {
      assert.ok(isDshieldError(err, ErrorCodes.CONFIG), String(err));
    }
  });

  t.run();
}

// ---------------------------------------------------------------------------
// logger file

const fileDef = definitions.get('logger-file.ts');
if (fileDef) {
  const t = suite('logger file: specifics');

  const withDir = async (body: (dir: string) => void | Promise<void>): Promise<void> => {
    const dir = tempDir();
    try {
      await body(dir);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  };

  const create = async (options: Record<string, unknown>, ctx: Partial<PluginContext>): Promise<LeveledLogger> =>
    (await fileDef.create(options, testContext(ctx))) as LeveledLogger;

  const readJsonLines = (path: string): Record<string, unknown>[] =>
    splitLines(readFileSync(path, 'utf8')).map((l) => JSON.parse(l) as Record<string, unknown>);

  t('writes JSON lines: time (ISO), level, scope, msg, then the fields', async () => {
    await withDir(async (baseDir) => {
      const logger = await create({}, { baseDir });
      const time = Date.UTC(2024, 0, 2, 3, 4, 5, 678);
      logger.log({ time, level: 'info', scope: 'server', msg: 'session up', fields: { client: 'alice', bytes: 12, err: new Error('nope'), msg: 'clash' } });
      await logger.close?.();
      const [entry, ...rest] = readJsonLines(join(baseDir, 'logs', 'dshield.log'));
      assert.is(rest.length, 0);
      assert.equal(entry, {
        time: '2024-01-02T03:04:05.678Z',
        level: 'info',
        scope: 'server',
        msg: 'session up',
        client: 'alice',
        bytes: 12,
        err: 'nope',
        _msg: 'clash',
      });
    });
  });

  t('creates the directory (0700) and the file (0600), relative to baseDir or absolute', async () => {
    await withDir(async (baseDir) => {
      const logger = await create({ dir: 'deep/er/logs', file: 'x.log' }, { baseDir });
      const dir = join(baseDir, 'deep/er/logs');
      assert.is(statSync(dir).mode & 0o777, 0o700);
      assert.is(statSync(join(dir, 'x.log')).mode & 0o777, 0o600);
      await logger.close?.();

      const absolute = join(baseDir, 'abs');
      const other = await create({ dir: absolute }, { baseDir: '/nonexistent-base' });
      other.log(record('warn', 'absolute dir'));
      await other.close?.();
      assert.ok(readFileSync(join(absolute, 'dshield.log'), 'utf8').includes('absolute dir'));
    });
  });

  t('rotates at maxBytes, keeps at most maxFiles files, loses no recent line and splits none', async () => {
    await withDir(async (baseDir) => {
      const maxBytes = 1000;
      const maxFiles = 3;
      // Leftovers of an earlier run with a larger maxFiles count against the limit too.
      mkdirSync(join(baseDir, 'logs'));
      writeFileSync(join(baseDir, 'logs', 'dshield.log.3'), 'old\n');
      writeFileSync(join(baseDir, 'logs', 'dshield.log.4'), 'old\n');
      const logger = await create({ maxBytes, maxFiles }, { baseDir });
      for (let i = 0; i < 200; i++) {
        // warn flushes at once: rotation happens across many writes, not one batch.
        logger.log(record(i % 2 ? 'warn' : 'info', `line ${i}`, { i, pad: 'p'.repeat(40) }));
      }
      await logger.close?.();
      const names = readdirSync(join(baseDir, 'logs')).sort();
      assert.equal(names, ['dshield.log', 'dshield.log.1', 'dshield.log.2']);
      const order = ['dshield.log.2', 'dshield.log.1', 'dshield.log'];
      const seen: number[] = [];
      for (const name of order) {
        const path = join(baseDir, 'logs', name);
        assert.ok(statSync(path).size <= maxBytes, `${name} is at most maxBytes`);
        for (const entry of readJsonLines(path)) seen.push(entry.i as number);
      }
      assert.is(seen[seen.length - 1], 199, 'the newest line is in the current file');
      seen.forEach((n, k) => k > 0 && assert.is(n, seen[k - 1]! + 1, 'kept lines are contiguous'));
      // Lines are ~150 bytes: about 6 fit in each of the 3 files.
      assert.ok(seen.length >= 15, `kept ${seen.length} lines`);
    });
  });

  t('maxFiles 1 keeps only the current file', async () => {
    await withDir(async (baseDir) => {
      const logger = await create({ maxBytes: 300, maxFiles: 1 }, { baseDir });
      for (let i = 0; i < 20; i++) logger.log(record('warn', `line ${i}`, { i }));
      await logger.close?.();
      assert.equal(readdirSync(join(baseDir, 'logs')), ['dshield.log']);
      const entries = readJsonLines(join(baseDir, 'logs', 'dshield.log'));
      assert.is(entries[entries.length - 1]!.i, 19);
    });
  });

  t('appending to an existing file counts its size toward maxBytes', async () => {
    await withDir(async (baseDir) => {
      mkdirSync(join(baseDir, 'logs'));
      writeFileSync(join(baseDir, 'logs', 'dshield.log'), `${JSON.stringify({ old: 'x'.repeat(900) })}\n`);
      const logger = await create({ maxBytes: 1000 }, { baseDir });
      logger.log(record('warn', 'fresh', { pad: 'y'.repeat(200) }));
      await logger.close?.();
      assert.ok(readFileSync(join(baseDir, 'logs', 'dshield.log.1'), 'utf8').includes('"old"'));
      assert.ok(readFileSync(join(baseDir, 'logs', 'dshield.log'), 'utf8').includes('fresh'));
    });
  });

  t('warn and error are on disk at once; info within a bounded delay; everything after abort at once', async () => {
    await withDir(async (baseDir) => {
      const controller = new AbortController();
      const logger = await create({}, { baseDir, signal: controller.signal });
      const path = join(baseDir, 'logs', 'dshield.log');
      const onDisk = () => readFileSync(path, 'utf8');
      logger.log(record('error', 'urgent'));
      assert.ok(onDisk().includes('urgent'), 'error written synchronously');
      logger.log(record('info', 'routine'));
      await withTimeout(
        (async () => {
          while (!onDisk().includes('routine')) await new Promise((r) => setTimeout(r, 20));
        })(),
        2000,
        'the buffered info line to reach the file',
      );
      controller.abort();
      logger.log(record('info', 'while shutting down'));
      assert.ok(onDisk().includes('while shutting down'), 'after abort, written synchronously');
      await logger.close?.();
    });
  });

  t('bad options and an unwritable directory are refused with DshieldError(CONFIG)', async () => {
    await withDir(async (baseDir) => {
      writeFileSync(join(baseDir, 'not-a-dir'), '');
      const cases: Record<string, unknown>[] = [
        { file: 'sub/dshield.log' },
        { maxBytes: 0 },
        { maxFiles: 1.5 },
        { dir: 'not-a-dir/logs' },
      ];
      for (const options of cases) {
        try {
          const logger = await create(options, { baseDir });
          await logger.close?.();
          assert.unreachable(`created with ${JSON.stringify(options)}`);
        } catch (err) {
          assert.ok(isDshieldError(err, ErrorCodes.CONFIG), `${JSON.stringify(options)}: ${String(err)}`);
        }
      }
    });
  });

  t('subscribes to nothing on the event bus', async () => {
    await withDir(async (baseDir) => {
      const ctx = testContext({ baseDir });
      const logger = (await fileDef.create({}, ctx)) as LeveledLogger;
      assert.is(ctx.events.eventNames().length, 0);
      await logger.close?.();
    });
  });

  t.run();
}

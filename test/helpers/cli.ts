/**
 * Runs the real CLI (`tsx bin/dshield.ts ...`) as child processes for
 * end-to-end tests: start, wait for a line with a time bound, stop by PID.
 * Every process started here is remembered and `stopAll()` ends it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ProcessOutput } from './output.ts';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const CLI = join(ROOT, 'bin', 'dshield.ts');
/** tsx's loader by absolute URL, so a test may run the CLI from any directory. */
const TSX = import.meta.resolve('tsx');

export interface Proc {
  child: ChildProcess;
  /** Everything printed so far, stdout and stderr interleaved. */
  output(): string;
  /** Resolves with the first match of `re` in the output; rejects after `ms` or if the process exits first. */
  waitFor(re: RegExp, ms?: number): Promise<RegExpMatchArray>;
  /** Resolves with the exit code (bounded). */
  exited(ms?: number): Promise<number | null>;
  /** SIGTERM, then SIGKILL after a grace period; resolves when it is gone. */
  stop(): Promise<void>;
}

const running = new Set<Proc>();

export function startCli(args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): Proc {
  const child = spawn(process.execPath, ['--import', TSX, CLI, ...args], {
    cwd: opts.cwd ?? ROOT,
    env: { ...process.env, FORCE_COLOR: '0', ...opts.env },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const out = new ProcessOutput(`dshield ${args.join(' ')}`);
  const onData = (chunk: Buffer) => {
    if (process.env.DSHIELD_TEST_VERBOSE) process.stderr.write(chunk);
    out.append(chunk.toString());
  };
  child.stdout!.on('data', onData);
  child.stderr!.on('data', onData);
  let exitCode: number | null | undefined;
  const exitPromise = new Promise<number | null>((resolve) => {
    child.on('exit', (code, signal) => {
      exitCode = code ?? (signal ? 128 : null);
      running.delete(proc);
      out.ended(String(exitCode));
      resolve(exitCode);
    });
  });

  const proc: Proc = {
    child,
    output: () => out.text,
    waitFor: (re, ms) => out.waitFor(re, ms),
    exited(ms = 20_000) {
      return Promise.race([
        exitPromise,
        new Promise<number | null>((_, reject) =>
          setTimeout(() => reject(new Error(`process did not exit within ${ms} ms; output:\n${out.text}`)), ms).unref(),
        ),
      ]);
    },
    async stop() {
      if (exitCode !== undefined) return;
      child.kill('SIGTERM');
      const killer = setTimeout(() => child.kill('SIGKILL'), 8_000);
      await exitPromise;
      clearTimeout(killer);
    },
  };
  running.add(proc);
  return proc;
}

/** Runs the CLI to completion (bounded); returns exit code and output. */
export async function runCli(
  args: string[],
  opts: { cwd?: string; env?: NodeJS.ProcessEnv; input?: string; timeoutMs?: number } = {},
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, ['--import', TSX, CLI, ...args], {
    cwd: opts.cwd ?? ROOT,
    env: { ...process.env, FORCE_COLOR: '0', ...opts.env },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
  child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
  child.stdin.end(opts.input ?? '');
  const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 30_000);
  const code = await new Promise<number | null>((resolve) => child.on('exit', (c) => resolve(c)));
  clearTimeout(timer);
  return { code, stdout, stderr };
}

export async function stopAll(): Promise<void> {
  await Promise.all([...running].map((p) => p.stop()));
}

/** A temp dir removed by the returned cleanup. */
export function tempDir(prefix = 'dshield-test-'): { dir: string; cleanup(): void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Writes a JSON config file into dir and returns its path. */
export function writeConfig(dir: string, config: unknown, name = 'dshield.config.json'): string {
  const path = join(dir, name);
  writeFileSync(path, JSON.stringify(config, null, 2));
  return path;
}

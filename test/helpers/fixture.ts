/**
 * Runs a test fixture (a TypeScript file under test/fixtures) in a node of
 * its own, through tsx, and resolves with its stdout. For cases that need a
 * fresh process: V8 or libc settings that can only be observed, or only be
 * changed, once per process. Rejects when the process fails or outlives
 * 60 s.
 */
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const TSX = import.meta.resolve('tsx');

export function runFixture(name: string, args: string[], nodeFlags: string[] = []): Promise<string> {
  const path = fileURLToPath(new URL(`../fixtures/${name}`, import.meta.url));
  return new Promise((resolve, reject) => {
    execFile(process.execPath, [...nodeFlags, '--import', TSX, path, ...args], { timeout: 60_000, maxBuffer: 16 << 20 }, (err, stdout) =>
      err ? reject(err) : resolve(stdout),
    );
  });
}

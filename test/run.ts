/**
 * `npm test`: runs every test/**\/*.test.ts file in its own process (so one
 * file's leftovers cannot touch another's), each with a time bound, and ends
 * with the plain closing line "N passed, N failed, N skipped".
 *
 *   npm test                     every file
 *   npm test -- mux noise        only files whose path contains "mux" or "noise"
 *
 * A file is skipped (not failed) when it exits with code 77 after printing why,
 * which the netns/TUN tests do when they lack root or /dev/net/tun.
 */
import { spawn } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const TEST_DIR = join(ROOT, 'test');
const FILE_TIMEOUT_MS = Number(process.env.DSHIELD_TEST_FILE_TIMEOUT ?? 300_000);
export const SKIP_EXIT_CODE = 77;

function findTests(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir).sort()) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) {
      if (name !== 'fixtures' && name !== 'helpers') out.push(...findTests(path));
    } else if (name.endsWith('.test.ts')) {
      out.push(path);
    }
  }
  return out;
}

interface FileResult {
  file: string;
  status: 'pass' | 'fail' | 'skip';
  tests: { passed: number; skipped: number; total: number };
  ms: number;
}

/** uvu prints "Total: N / Passed: N / Skipped: N"; we add those up across files. */
function parseUvuTotals(output: string): { passed: number; skipped: number; total: number } {
  // eslint-disable-next-line no-control-regex
  const clean = output.replace(/\u001b\[[0-9;]*m/g, '');
  const sum = (re: RegExp) => [...clean.matchAll(re)].reduce((n, m) => n + Number(m[1]), 0);
  return { total: sum(/Total:\s+(\d+)/g), passed: sum(/Passed:\s+(\d+)/g), skipped: sum(/Skipped:\s+(\d+)/g) };
}

function runFile(file: string): Promise<FileResult> {
  const started = Date.now();
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['--import', 'tsx', file], {
      cwd: ROOT,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, FORCE_COLOR: '0' },
    });
    let output = '';
    const collect = (chunk: Buffer) => {
      output += chunk.toString();
      process.stdout.write(chunk);
    };
    child.stdout.on('data', collect);
    child.stderr.on('data', collect);
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      process.stdout.write(`\n[run] ${relative(ROOT, file)} exceeded ${FILE_TIMEOUT_MS} ms; stopping it\n`);
      child.kill('SIGTERM');
      setTimeout(() => child.kill('SIGKILL'), 5_000).unref();
    }, FILE_TIMEOUT_MS);
    child.on('close', (code) => {
      clearTimeout(timer);
      const tests = parseUvuTotals(output);
      const status = timedOut ? 'fail' : code === 0 ? 'pass' : code === SKIP_EXIT_CODE ? 'skip' : 'fail';
      resolve({ file, status, tests, ms: Date.now() - started });
    });
  });
}

async function main(): Promise<void> {
  const filters = process.argv.slice(2);
  const files = findTests(TEST_DIR).filter((f) => filters.length === 0 || filters.some((x) => f.includes(x)));
  if (files.length === 0) {
    console.error(`no test files match ${filters.join(' ')}`);
    process.exit(1);
  }
  const results: FileResult[] = [];
  for (const file of files) {
    console.log(`\n=== ${relative(ROOT, file)}`);
    results.push(await runFile(file));
  }

  console.log('\n=== summary');
  for (const r of results) {
    const mark = r.status === 'pass' ? 'ok  ' : r.status === 'skip' ? 'skip' : 'FAIL';
    console.log(`${mark} ${relative(ROOT, r.file)}  (${r.tests.passed}/${r.tests.total} tests, ${(r.ms / 1000).toFixed(1)} s)`);
  }
  const failedFiles = results.filter((r) => r.status === 'fail');
  const skippedFiles = results.filter((r) => r.status === 'skip');
  let passed = 0;
  let failed = 0;
  let skipped = 0;
  for (const r of results) {
    passed += r.tests.passed;
    skipped += r.tests.skipped;
    // A failed file counts at least one failure even if it died before uvu's summary.
    if (r.status === 'fail') failed += Math.max(1, r.tests.total - r.tests.passed - r.tests.skipped);
    if (r.status === 'skip' && r.tests.total === 0) skipped += 1;
  }
  console.log(`files: ${results.length - failedFiles.length - skippedFiles.length} passed, ${failedFiles.length} failed, ${skippedFiles.length} skipped`);
  console.log(`${passed} passed, ${failed} failed, ${skipped} skipped`);
  process.exit(failedFiles.length > 0 ? 1 : 0);
}

await main();

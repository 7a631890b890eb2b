/**
 * Start a worker thread whose entry is a TypeScript module.
 *
 * Under Node 20, a worker does not inherit the tsx loader the main thread was
 * started with (`--import tsx` hooks stay on the main thread), so `new
 * Worker('x.ts')` fails with ERR_UNKNOWN_FILE_EXTENSION. The worker is started
 * from a tiny bootstrap instead that registers tsx's ESM hooks in the worker,
 * then imports the entry. A .js/.mjs entry is started directly.
 */
import { Worker, type WorkerOptions } from 'node:worker_threads';

export function startTsWorker(entry: URL, options: WorkerOptions = {}): Worker {
  if (!entry.pathname.endsWith('.ts')) return new Worker(entry, options);
  const tsxApi = import.meta.resolve('tsx/esm/api');
  // An eval'd worker is CommonJS; dynamic import() loads ESM from it. Errors
  // reject the promise, which Node reports as the worker's 'error' event.
  const bootstrap =
    `import(${JSON.stringify(tsxApi)})` +
    `.then((tsx) => { tsx.register(); return import(${JSON.stringify(entry.href)}); })` +
    `.catch((err) => { process.nextTick(() => { throw err; }); });`;
  return new Worker(bootstrap, { ...options, eval: true });
}

/**
 * Scale driver, run in the client namespace against a SOCKS5 proxy:
 *
 *   node --import tsx bench/drivers/streams.ts idle   SOCKS_HOST SOCKS_PORT TARGET_IP TARGET_PORT COUNT
 *   node --import tsx bench/drivers/streams.ts active SOCKS_HOST SOCKS_PORT TARGET_IP TARGET_PORT COUNT SECONDS [PAUSE_MIN_MS PAUSE_MAX_MS]
 *
 * idle:   opens COUNT streams (SOCKS5 CONNECT to a server that holds them
 *         silently), prints `OPENED {json}` and keeps them until SIGTERM.
 * active: opens COUNT streams to an echo server, then on every stream, for
 *         SECONDS: send 1 KiB, wait for its echo (one "request"), pause
 *         PAUSE_MIN..PAUSE_MAX ms (default 10–30: as fast as the proxy goes), repeat.
 *         Latency percentiles leave out the first second (warm-up). Prints `RESULT {json}`: requests, bytes, latency
 *         percentiles, and the fewest requests any stream completed (0 = a
 *         stream starved).
 */
import { connect, type Socket } from 'node:net';

const [mode, socksHost, socksPortText, targetIp, targetPortText, countText, secondsText, pauseMinText, pauseMaxText] = process.argv.slice(2);
const pauseMin = Number(pauseMinText ?? 10);
const pauseSpan = Number(pauseMaxText ?? 30) - pauseMin;
const socksPort = Number(socksPortText);
const targetPort = Number(targetPortText);
const count = Number(countText);
const OPEN_CONCURRENCY = 200;
/**
 * active: latencies of requests sent in the first second are not counted
 * (the proxy's code is still being compiled by the JIT, the streams' first
 * bytes set up their paths); every request counts for throughput and for
 * the fewest requests a stream completed.
 */
const WARMUP_MS = 1000;

/** One SOCKS5 CONNECT (no auth, IPv4 target); resolves with the socket once the proxy says 0x00. */
function socksConnect(): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect({ host: socksHost!, port: socksPort, noDelay: true });
    let stage = 0;
    let buf = Buffer.alloc(0);
    const timer = setTimeout(() => fail(new Error('SOCKS5 connect timed out (30 s)')), 30_000);
    const fail = (err: Error) => {
      clearTimeout(timer);
      s.destroy();
      reject(err);
    };
    s.once('error', fail);
    s.on('connect', () => s.write(Buffer.from([5, 1, 0])));
    const onData = (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      if (stage === 0 && buf.length >= 2) {
        if (buf[0] !== 5 || buf[1] !== 0) return fail(new Error('SOCKS5: no acceptable auth method'));
        buf = buf.subarray(2);
        stage = 1;
        const req = Buffer.alloc(10);
        req.set([5, 1, 0, 1]);
        targetIp!.split('.').forEach((o, i) => (req[4 + i] = Number(o)));
        req.writeUInt16BE(targetPort, 8);
        s.write(req);
      }
      if (stage === 1 && buf.length >= 10) {
        if (buf[1] !== 0) return fail(new Error(`SOCKS5 reply 0x${buf[1]!.toString(16)}`));
        clearTimeout(timer);
        s.off('data', onData);
        s.off('error', fail);
        s.on('error', () => {});
        resolve(s);
      }
    };
    s.on('data', onData);
  });
}

async function openMany(n: number): Promise<{ sockets: Socket[]; failed: number; firstError?: string }> {
  const sockets: Socket[] = [];
  let failed = 0;
  let firstError: string | undefined;
  let next = 0;
  const lane = async () => {
    while (next < n) {
      next++;
      try {
        sockets.push(await socksConnect());
      } catch (err) {
        failed++;
        firstError ??= (err as Error).message;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(OPEN_CONCURRENCY, n) }, lane));
  return { sockets, failed, firstError };
}

function percentile(sorted: Float64Array, p: number): number {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]! : 0;
}

async function idle(): Promise<void> {
  const t0 = performance.now();
  const { sockets, failed, firstError } = await openMany(count);
  console.log(`OPENED ${JSON.stringify({ opened: sockets.length, failed, firstError, ms: Math.round(performance.now() - t0) })}`);
  process.on('SIGTERM', () => {
    for (const s of sockets) s.destroy();
    process.exit(0);
  });
  setInterval(() => {}, 60_000);
}

async function active(): Promise<void> {
  const seconds = Number(secondsText);
  const { sockets, failed, firstError } = await openMany(count);
  const payload = Buffer.alloc(1024, 'a');
  const latencies: number[] = [];
  const perStream = new Array<number>(sockets.length).fill(0);
  let bytes = 0;
  const started = performance.now();
  const deadline = started + seconds * 1000;
  const streams = Promise.all(
    sockets.map(
      (s, i) =>
        new Promise<void>((resolve) => {
          let pending = 0;
          let sentAt = 0;
          const send = () => {
            if (performance.now() >= deadline) return resolve();
            pending = payload.length;
            sentAt = performance.now();
            s.write(payload);
          };
          s.on('data', (c: Buffer) => {
            pending -= c.length;
            if (pending <= 0) {
              if (sentAt - started >= WARMUP_MS) latencies.push(performance.now() - sentAt);
              perStream[i]!++;
              bytes += 2 * payload.length;
              setTimeout(send, pauseMin + Math.random() * pauseSpan);
            }
          });
          s.on('close', () => resolve());
          // Spread the first requests over a whole pause (at least 100 ms), so
          // the offered load is steady from the start instead of one burst.
          setTimeout(send, Math.random() * Math.max(100, pauseMin + pauseSpan));
        }),
    ),
  );
  // A stream whose echo never comes back must not hold the run: bounded wait.
  await Promise.race([streams, new Promise((r) => setTimeout(r, seconds * 1000 + 15_000))]);
  const elapsed = (performance.now() - started) / 1000;
  const sorted = Float64Array.from(latencies).sort();
  console.log(
    `RESULT ${JSON.stringify({
      streams: sockets.length,
      failed,
      firstError,
      seconds: elapsed,
      requests: latencies.length,
      bytes,
      p50: percentile(sorted, 50),
      p99: percentile(sorted, 99),
      max: sorted.length ? sorted[sorted.length - 1] : 0,
      minPerStream: perStream.length ? Math.min(...perStream) : 0,
    })}`,
  );
  for (const s of sockets) s.destroy();
  process.exit(0);
}

if (mode === 'idle') await idle();
else if (mode === 'active') await active();
else {
  console.error('usage: streams.ts idle|active SOCKS_HOST SOCKS_PORT TARGET_IP TARGET_PORT COUNT [SECONDS]');
  process.exit(2);
}

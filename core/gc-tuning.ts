/**
 * How V8's garbage collector is set for a process that forwards traffic,
 * applied once by the CLI before a client, server or local mode starts.
 *
 * The problem it solves: dshield's JavaScript heap is small (about 10 MB
 * live) and the data path allocates little on it, but every socket read
 * and every UDP datagram arrives in a fresh ArrayBuffer outside it, tens
 * of megabytes a second at full speed. V8 sizes the old generation's limit
 * from the small live heap and counts those short-lived buffers against it,
 * so during a transfer it starts incremental marking again as soon as the
 * last one finished: a major GC every ~70 ms (about 250 in a 1 GiB SOCKS5
 * download, each marking the whole heap on a second thread), nearly all of
 * it for buffers a scavenge frees anyway.
 *
 * With incremental marking off, V8 collects the old generation only when it
 * is full, in one atomic pause (14-22 ms at this heap size, measured); the
 * buffers still go in scavenges. Measured in the same sitting on loopback,
 * 1 GiB through SOCKS5 with curl: 2-3 major GCs instead of ~250, and about
 * 3 CPU-seconds per GiB in each process instead of about 6.
 *
 * Node accepts V8 flags at run time (v8.setFlagsFromString); this one only
 * decides whether a new marking cycle may start, so flipping it before any
 * traffic is safe. An explicit --incremental-marking or
 * --no-incremental-marking on the node command line wins.
 */
import v8 from 'node:v8';

const FLAG = /^--(no-)?incremental[-_]marking$/;

/**
 * Turn V8's incremental marking off unless `execArgv` (node's own flags)
 * says otherwise. Returns whether it changed the setting.
 */
export function tuneGarbageCollector(execArgv: readonly string[] = process.execArgv): boolean {
  if (execArgv.some((arg) => FLAG.test(arg))) return false;
  v8.setFlagsFromString('--no-incremental-marking');
  return true;
}

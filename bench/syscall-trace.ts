/**
 * What `perf script` says a process's busiest thread did between its
 * syscalls, from a recording of the raw_syscalls tracepoints
 * (`perf record -e raw_syscalls:sys_enter -e raw_syscalls:sys_exit`).
 *
 * A thread is either inside a syscall (from its entry to its exit) or
 * running its own code between one syscall's exit and the next one's entry
 * (or waiting for a CPU to run it on). For a tunnel's packet thread, a step
 * such as recvfrom -> write is the time from a datagram read to its packet
 * written into the TUN: the process's own work on that packet. A syscall
 * that blocks (a poll, an epoll wait that slept) is the thread asleep, and
 * is not counted as kernel time.
 */

/** x86-64 syscall numbers of the calls a tunnel's data path makes; others are shown by number. */
const SYSCALL_NAMES = new Map<number, string>([
  [0, 'read'],
  [1, 'write'],
  [7, 'poll'],
  [16, 'ioctl'],
  [19, 'readv'],
  [20, 'writev'],
  [23, 'select'],
  [44, 'sendto'],
  [45, 'recvfrom'],
  [46, 'sendmsg'],
  [47, 'recvmsg'],
  [202, 'futex'],
  [232, 'epoll_wait'],
  [270, 'pselect6'],
  [271, 'ppoll'],
  [281, 'epoll_pwait'],
  [299, 'recvmmsg'],
  [307, 'sendmmsg'],
  [441, 'epoll_pwait2'],
]);
/** Calls that wait for something to be ready: inside them longer than BLOCKED_US, the thread slept. */
const WAITS = new Set(['poll', 'ppoll', 'select', 'pselect6', 'epoll_wait', 'epoll_pwait', 'epoll_pwait2', 'futex']);
const BLOCKED_US = 30;

export interface ThreadSteps {
  tid: number;
  /** Syscall entries and exits of this thread in the recording. */
  events: number;
  /** µs the thread ran its own code between syscalls, in all. */
  ownUs: number;
  /** µs it spent inside syscalls that did not sleep, in all. */
  kernelUs: number;
  /** µs between one call's exit and the next one's entry, by 'exit -> entry' (e.g. 'recvfrom -> write'). */
  steps: Map<string, number[]>;
  /** µs inside each call, by its name (sleeping waits included). */
  calls: Map<string, number[]>;
}

/** The name `perf script` gives syscall `nr` here. */
export function syscallName(nr: number): string {
  return SYSCALL_NAMES.get(nr) ?? `#${nr}`;
}

const LINE = /^\s*(\d+)\s+(\d+\.\d+):\s+raw_syscalls:sys_(enter|exit):\s+NR (\d+)/;

/**
 * The steps of the thread with the most syscall events in `script` (the
 * output of `perf script -F tid,time,event,trace`): in a tunnel's process,
 * the thread that carries the packets. Undefined when there are none.
 */
export function busiestThreadSteps(script: string): ThreadSteps | undefined {
  const byThread = new Map<number, Array<{ us: number; enter: boolean; call: string }>>();
  for (const line of script.split('\n')) {
    const m = LINE.exec(line);
    if (m === null) continue;
    const tid = Number(m[1]);
    let events = byThread.get(tid);
    if (events === undefined) byThread.set(tid, (events = []));
    // perf prints seconds with microsecond digits: rounding drops float noise below them.
    events.push({ us: Math.round(Number(m[2]) * 1e6), enter: m[3] === 'enter', call: syscallName(Number(m[4])) });
  }
  let tid = -1;
  for (const [id, events] of byThread) if (tid === -1 || events.length > byThread.get(tid)!.length) tid = id;
  if (tid === -1) return undefined;
  const result: ThreadSteps = { tid, events: byThread.get(tid)!.length, ownUs: 0, kernelUs: 0, steps: new Map(), calls: new Map() };
  let exited: { us: number; call: string } | null = null;
  let entered: { us: number; call: string } | null = null;
  for (const e of byThread.get(tid)!) {
    if (e.enter) {
      if (exited !== null) {
        const gap = e.us - exited.us;
        push(result.steps, `${exited.call} -> ${e.call}`, gap);
        result.ownUs += gap;
      }
      entered = e;
    } else {
      // An exit without its entry (the recording started inside the call) has no duration.
      if (entered !== null && entered.call === e.call) {
        const inside = e.us - entered.us;
        push(result.calls, e.call, inside);
        if (!(WAITS.has(e.call) && inside > BLOCKED_US)) result.kernelUs += inside;
      }
      entered = null;
      exited = e;
    }
  }
  return result;
}

function push(map: Map<string, number[]>, key: string, value: number): void {
  const list = map.get(key);
  if (list === undefined) map.set(key, [value]);
  else list.push(value);
}

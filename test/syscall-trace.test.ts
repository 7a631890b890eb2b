/**
 * bench/syscall-trace.ts reads `perf script` output of syscall tracepoints:
 * it must find the thread that made the most calls and split its time into
 * its own code between calls and time inside calls that did not sleep.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { busiestThreadSteps, syscallName } from '../bench/syscall-trace.ts';

/** One line as `perf script -F tid,time,event,trace` prints it. */
function line(tid: number, us: number, enter: boolean, nr: number): string {
  const time = (1000 + us / 1e6).toFixed(6);
  return enter ? `${tid} ${time}: raw_syscalls:sys_enter: NR ${nr} (3, 7f00, 10, 0, 0, 0)` : `${tid} ${time}:  raw_syscalls:sys_exit: NR ${nr} = 84`;
}

test('a ping through a packet thread: its own steps and its calls, the sleeping poll not counted as kernel time', () => {
  const POLL = 7, RECVFROM = 45, WRITE = 1, READ = 0, SENDTO = 44;
  const packetThread = [
    line(10, 0, true, POLL), // asleep until the datagram comes
    line(10, 5000, false, POLL),
    line(10, 5030, true, RECVFROM), // 30 µs of its own code
    line(10, 5034, false, RECVFROM),
    line(10, 5084, true, WRITE), // 50: open the record
    line(10, 5114, false, WRITE),
    line(10, 5122, true, READ), // 8
    line(10, 5123, false, READ),
    line(10, 5135, true, SENDTO), // 12: seal the answer
    line(10, 5145, false, SENDTO),
    line(10, 5151, true, POLL), // 6
    line(10, 9000, false, POLL),
  ];
  const otherThread = [line(11, 100, true, 202), line(11, 400, false, 202)];
  const script = ['# a header line', ...otherThread.slice(0, 1), ...packetThread, ...otherThread.slice(1)].join('\n');
  const steps = busiestThreadSteps(script)!;
  assert.is(steps.tid, 10);
  assert.is(steps.events, 12);
  assert.equal([...steps.steps.keys()], ['poll -> recvfrom', 'recvfrom -> write', 'write -> read', 'read -> sendto', 'sendto -> poll']);
  assert.equal(steps.steps.get('recvfrom -> write'), [50]);
  assert.is(steps.ownUs, 30 + 50 + 8 + 12 + 6);
  assert.is(steps.kernelUs, 4 + 30 + 1 + 10, 'the two polls slept: not kernel time');
  assert.equal(steps.calls.get('poll'), [5000, 3849]);
});

test('a poll that returned at once is kernel time; an exit without its entry has no duration', () => {
  const script = [line(3, 0, false, 7), line(3, 10, true, 7), line(3, 12, false, 7), line(3, 20, true, 45), line(3, 24, false, 45)].join('\n');
  const steps = busiestThreadSteps(script)!;
  assert.equal(steps.calls.get('poll'), [2]);
  assert.is(steps.kernelUs, 2 + 4);
  assert.equal(steps.steps.get('poll -> poll'), [10]);
  assert.equal(steps.steps.get('poll -> recvfrom'), [8]);
});

test('no syscall lines: undefined; unknown calls go by number', () => {
  assert.is(busiestThreadSteps('nothing here\n'), undefined);
  assert.is(syscallName(45), 'recvfrom');
  assert.is(syscallName(999), '#999');
});

test.run();

/**
 * A journal of the system changes a running dshield has made, kept in a file
 * so that a crash (SIGKILL, power loss) does not leave routes, firewall
 * tables or a replaced resolv.conf behind for good.
 *
 * Write-ahead: a change is recorded (and the file synced) before it is
 * applied, so the file lists everything that may have been applied; undoing
 * something never applied is harmless (undo.ts). On the next start,
 * `recoverLeftovers` finds files whose owner is dead and undoes them.
 *
 * The default directory is /var/lib/dshield, not /run: routes and nftables
 * rules die with a reboot, but a replaced /etc/resolv.conf survives one, so
 * its record must too. Owner liveness is the PID plus the process start time
 * and the boot id, so a reused PID or a reboot is never taken for the owner.
 *
 * One file per instance and network namespace: <dir>/<name>.<netns>.json
 * (netns: the inode of /proc/self/ns/net), with backups beside it
 * (<dir>/<name>.<netns>.<label>.bak, mode 0600). Routes and firewall tables
 * live in a network namespace, so a run only ever recovers files of its own
 * namespace: instances in different namespaces (tests, containers sharing a
 * filesystem) never touch each other's state.
 */
import { closeSync, fsyncSync, mkdirSync, openSync, readdirSync, readFileSync, readlinkSync, renameSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { DshieldError, ErrorCodes } from '../errors.ts';
import { describeUndo, undo, type UndoRecord } from './undo.ts';

export const DEFAULT_STATE_DIR = '/var/lib/dshield';

export interface StateFile {
  version: 1;
  /** The instance name (also the file name). */
  name: string;
  pid: number;
  /** Field 22 of /proc/<pid>/stat (start time in clock ticks since boot). */
  pidStart: string | null;
  /** /proc/sys/kernel/random/boot_id when the file was written. */
  bootId: string | null;
  created: string;
  records: UndoRecord[];
}

const NAME_RE = /^[A-Za-z0-9_-]{1,64}$/;

/** The inode number of this process's network namespace ("4026531840" for the host's). */
export function currentNetns(): string {
  try {
    return /\[(\d+)\]/.exec(readlinkSync('/proc/self/ns/net'))?.[1] ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

function readBootId(): string | null {
  try {
    return readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return null;
  }
}

/**
 * Start time of a process (clock ticks since boot), or null if it does not
 * exist or is a zombie (dead, not yet reaped by its parent).
 */
export function processStartTime(pid: number): string | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (rest[0] === 'Z' || rest[0] === 'X') return null; // field 3: state
    return rest[19] ?? null; // field 22 overall = index 19 after "pid (comm) "
  } catch {
    return null;
  }
}

/** True when the process that wrote `state` still runs. */
export function ownerAlive(state: Pick<StateFile, 'pid' | 'pidStart' | 'bootId'>): boolean {
  const boot = readBootId();
  if (state.bootId && boot && state.bootId !== boot) return false;
  try {
    process.kill(state.pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  const start = processStartTime(state.pid);
  if (start === null) return false;
  return state.pidStart === null || state.pidStart === start;
}

function writeAtomic(path: string, data: string): void {
  const tmp = `${path}.tmp`;
  const fd = openSync(tmp, 'w', 0o600);
  try {
    writeSync(fd, data);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, path);
}

export class StateJournal {
  readonly dir: string;
  readonly name: string;
  readonly path: string;
  /** File name stem: <name>.<netns>. */
  private readonly stem: string;
  private state: StateFile;
  private finished = false;

  private constructor(dir: string, name: string, state: StateFile) {
    this.dir = dir;
    this.name = name;
    this.stem = `${name}.${currentNetns()}`;
    this.path = join(dir, `${this.stem}.json`);
    this.state = state;
  }

  /**
   * Start a journal for instance `name` in `dir` (created, mode 0700).
   * Throws DshieldError(TUN) if a file for that name exists: a live owner
   * means another instance runs; a dead one must be recovered first
   * (`recoverLeftovers`).
   */
  static create(dir: string, name: string): StateJournal {
    if (!NAME_RE.test(name)) throw new DshieldError(ErrorCodes.TUN, `invalid state name "${name}"`);
    try {
      mkdirSync(dir, { recursive: true, mode: 0o700 });
    } catch (err) {
      throw new DshieldError(ErrorCodes.TUN, `cannot create the state directory ${dir}: ${(err as Error).message}`, { cause: err });
    }
    const path = join(dir, `${name}.${currentNetns()}.json`);
    const existing = readState(path);
    if (existing) {
      if (ownerAlive(existing)) {
        throw new DshieldError(ErrorCodes.TUN, `another dshield (pid ${existing.pid}) is running with TUN state ${path}`);
      }
      throw new DshieldError(ErrorCodes.TUN, `${path} is left over from a crashed run; recover it first`);
    }
    const state: StateFile = {
      version: 1,
      name,
      pid: process.pid,
      pidStart: processStartTime(process.pid),
      bootId: readBootId(),
      created: new Date().toISOString(),
      records: [],
    };
    const journal = new StateJournal(dir, name, state);
    journal.save();
    return journal;
  }

  get records(): readonly UndoRecord[] {
    return this.state.records;
  }

  /** A path for a backup file that recovery removes with the journal. */
  backupPath(label: string): string {
    if (!/^[A-Za-z0-9_-]{1,32}$/.test(label)) throw new Error(`bad backup label ${label}`);
    return join(this.dir, `${this.stem}.${label}.bak`);
  }

  /** Record a change before applying it (synced to disk before returning). */
  add(rec: UndoRecord): void {
    if (this.finished) throw new Error('journal already finished');
    this.state.records.push(rec);
    this.save();
  }

  /** Forget a change once it has been undone. */
  remove(rec: UndoRecord): void {
    const i = this.state.records.lastIndexOf(rec);
    if (i < 0 || this.finished) return;
    this.state.records.splice(i, 1);
    this.save();
  }

  /** Everything is undone: delete the file and the backups. */
  finish(): void {
    if (this.finished) return;
    this.finished = true;
    removeStateFiles(this.dir, this.stem);
  }

  private save(): void {
    writeAtomic(this.path, `${JSON.stringify(this.state, null, 2)}\n`);
  }
}

function readState(path: string): StateFile | undefined {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch {
    return undefined;
  }
  try {
    const s = JSON.parse(text) as StateFile;
    if (s && s.version === 1 && Array.isArray(s.records) && typeof s.pid === 'number') return s;
  } catch {
    // unreadable: treated as a dead owner with nothing to undo
  }
  return { version: 1, name: '', pid: 0, pidStart: null, bootId: null, created: '', records: [] };
}

function removeStateFiles(dir: string, stem: string): void {
  for (const f of safeReaddir(dir)) {
    if (f === `${stem}.json` || f === `${stem}.json.tmp` || (f.startsWith(`${stem}.`) && f.endsWith('.bak'))) {
      rmSync(join(dir, f), { force: true });
    }
  }
}

function safeReaddir(dir: string): string[] {
  try {
    return readdirSync(dir);
  } catch {
    return [];
  }
}

export interface RecoveryReport {
  name: string;
  /** PID of the dead run. */
  pid: number;
  /** What was undone, in order. */
  undone: string[];
  /** Undos that failed (the file is kept so the next start tries again). */
  failed: string[];
  /** Things left alone on purpose. */
  notes: string[];
}

/**
 * Undo what dead runs in this network namespace left behind: every state
 * file in `dir` (or only `name`'s) whose owner is dead, newest change first.
 * A file whose undo fully succeeded is removed with its backups. Files of
 * live owners and of other namespaces are skipped.
 */
export async function recoverLeftovers(dir: string = DEFAULT_STATE_DIR, opts: { name?: string } = {}): Promise<RecoveryReport[]> {
  const reports: RecoveryReport[] = [];
  const suffix = `.${currentNetns()}.json`;
  for (const f of safeReaddir(dir)) {
    if (!f.endsWith(suffix)) continue;
    const stem = f.slice(0, -'.json'.length);
    const name = f.slice(0, -suffix.length);
    if (opts.name !== undefined && name !== opts.name) continue;
    const state = readState(join(dir, f));
    if (!state || (state.pid !== 0 && ownerAlive(state))) continue;
    const report: RecoveryReport = { name, pid: state.pid, undone: [], failed: [], notes: [] };
    for (const rec of [...state.records].reverse()) {
      try {
        const note = await undo(rec);
        if (note) report.notes.push(note);
        else report.undone.push(describeUndo(rec));
      } catch (err) {
        report.failed.push(`${describeUndo(rec)}: ${(err as Error).message}`);
      }
    }
    if (report.failed.length === 0) removeStateFiles(dir, stem);
    reports.push(report);
  }
  return reports;
}

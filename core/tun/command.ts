/**
 * Runs the system tools TUN mode configures the network with (`ip`, `nft`):
 * execFile with an argument list (never a shell string), a bounded time and
 * a bounded output, and errors that name the command and quote its message.
 */
import { execFile } from 'node:child_process';
import { DshieldError, ErrorCodes } from '../errors.ts';

export interface CommandResult {
  stdout: string;
  stderr: string;
}

export interface CommandOptions {
  /** Written to stdin (e.g. an nft script for `nft -f -`). */
  input?: string;
  /** Milliseconds before the command is killed (default 5 s). */
  timeout?: number;
}

/** Thrown by runCommand when the command ran and failed; `stderr` says why. */
export class CommandError extends DshieldError {
  readonly stderr: string;
  readonly exitCode: number | null;
  constructor(cmdline: string, stderr: string, exitCode: number | null, cause?: unknown) {
    const why = stderr.trim().split('\n').filter(Boolean).slice(0, 2).join(' / ') || `exit code ${exitCode}`;
    super(ErrorCodes.TUN, `${cmdline}: ${why}`, { cause, detail: { exitCode } });
    this.name = 'CommandError';
    this.stderr = stderr;
    this.exitCode = exitCode;
  }
}

export const DEFAULT_COMMAND_TIMEOUT = 5_000;

export function runCommand(cmd: string, args: readonly string[], opts: CommandOptions = {}): Promise<CommandResult> {
  const timeout = opts.timeout ?? DEFAULT_COMMAND_TIMEOUT;
  const cmdline = [cmd, ...args].join(' ');
  return new Promise((resolve, reject) => {
    const child = execFile(
      cmd,
      args,
      { timeout, killSignal: 'SIGKILL', maxBuffer: 4 * 1024 * 1024, env: { ...process.env, LC_ALL: 'C' } },
      (err, stdout, stderr) => {
        if (!err) {
          resolve({ stdout, stderr });
          return;
        }
        const e = err as NodeJS.ErrnoException & { killed?: boolean; code?: unknown };
        if (e.code === 'ENOENT') {
          const pkg = cmd === 'nft' ? 'nftables' : cmd === 'ip' ? 'iproute2' : cmd;
          reject(new DshieldError(ErrorCodes.TUN, `TUN mode needs the "${cmd}" command (apt-get install ${pkg})`, { cause: err }));
        } else if (e.killed) {
          reject(new CommandError(cmdline, `timed out after ${timeout} ms`, null, err));
        } else {
          reject(new CommandError(cmdline, stderr || e.message, typeof e.code === 'number' ? e.code : null, err));
        }
      },
    );
    child.stdin?.on('error', () => {}); // a command that exits early closes its stdin: not our error
    child.stdin?.end(opts.input ?? '');
  });
}

/** True when a failed `ip` command said the thing is already there. */
export function isExists(err: unknown): boolean {
  return err instanceof CommandError && /File exists/i.test(err.stderr);
}

/** True when a failed `ip`/`nft` command said the thing is not there (undo of something already gone). */
export function isMissing(err: unknown): boolean {
  return (
    err instanceof CommandError &&
    /No such process|No such file or directory|Cannot find device|does not exist|Cannot assign requested address|No such device/i.test(err.stderr)
  );
}

/**
 * A child process's output as it arrives, and a bounded wait for the first
 * match of a pattern in it. Shared by the process helpers of the tests
 * (cli.ts, tun-e2e.ts) and of the bench (bench/proc.ts).
 */
export class ProcessOutput {
  private current = '';
  private exit: string | undefined;
  private readonly listeners = new Set<() => void>();

  /**
   * @param label names the process in errors ("server in dsh1-server")
   * @param keep  how to add a chunk (default: append all); a bench server that logs a lot keeps less
   */
  constructor(
    private readonly label: string,
    private readonly keep: (text: string, chunk: string) => string = (text, chunk) => text + chunk,
  ) {}

  get text(): string {
    return this.current;
  }

  append(chunk: string): void {
    this.current = this.keep(this.current, chunk);
    this.notify();
  }

  /** The process is gone; `how` says how (an exit code, a signal). Pending waits fail. */
  ended(how: string): void {
    this.exit = how;
    this.notify();
  }

  /** The first match of `re`; rejects after `ms`, or when the process ends first. `show` trims the output quoted in errors. */
  waitFor(re: RegExp, ms = 20_000, show: (text: string) => string = (t) => t): Promise<RegExpMatchArray> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        done();
        reject(new Error(`${this.label}: timed out after ${ms} ms waiting for ${re}; output:\n${show(this.current)}`));
      }, ms);
      const done = () => {
        clearTimeout(timer);
        this.listeners.delete(check);
      };
      const check = () => {
        const m = this.current.match(re);
        if (m) {
          done();
          resolve(m);
        } else if (this.exit !== undefined) {
          done();
          reject(new Error(`${this.label} exited (${this.exit}) before printing ${re}; output:\n${show(this.current)}`));
        }
      };
      this.listeners.add(check);
      check();
    });
  }

  private notify(): void {
    for (const l of this.listeners) l();
  }
}

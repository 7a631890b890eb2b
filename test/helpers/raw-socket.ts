/**
 * A TCP client for byte-level protocol tests: write exact bytes, read an
 * exact count or up to a delimiter, and see when the peer closes. Every read
 * has a time bound and names what it waited for when it times out.
 */
import { connect, type Socket } from 'node:net';

export class RawSocket {
  readonly socket: Socket;
  private buffer: Buffer = Buffer.alloc(0);
  private ended = false;
  private wake: (() => void) | undefined;
  /** Resolves when the peer ends or resets the connection, or it is closed here. */
  readonly closed: Promise<void>;

  private constructor(socket: Socket) {
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => {
      this.buffer = Buffer.concat([this.buffer, chunk]);
      this.wake?.();
    });
    socket.on('end', () => {
      this.ended = true;
      this.wake?.();
    });
    socket.on('error', () => {
      this.ended = true;
      this.wake?.();
    });
    this.closed = new Promise((resolve) => {
      socket.once('end', () => resolve());
      socket.once('close', () => resolve());
    });
  }

  static open(port: number, host = '127.0.0.1', ms = 5_000): Promise<RawSocket> {
    return new Promise((resolve, reject) => {
      const socket = connect({ port, host, allowHalfOpen: true });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`could not connect to ${host}:${port} within ${ms} ms`));
      }, ms);
      socket.once('connect', () => {
        clearTimeout(timer);
        resolve(new RawSocket(socket));
      });
      socket.once('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
    });
  }

  write(bytes: Buffer | string | number[]): void {
    this.socket.write(Array.isArray(bytes) ? Buffer.from(bytes) : bytes);
  }

  /** Bytes received and not read yet. */
  get pending(): Buffer {
    return this.buffer;
  }

  /** True once the peer ended or the connection failed. */
  get isEnded(): boolean {
    return this.ended;
  }

  private async waitFor<T>(ready: () => T | undefined, ms: number, what: string): Promise<T> {
    const deadline = Date.now() + ms;
    for (;;) {
      const value = ready();
      if (value !== undefined) return value;
      if (this.ended) throw new Error(`connection ended while waiting for ${what} (have ${this.buffer.length} bytes)`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out after ${ms} ms waiting for ${what} (have ${this.buffer.length} bytes)`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.wake = undefined;
    }
  }

  /** Exactly n bytes. */
  read(n: number, ms = 5_000, what = `${n} bytes`): Promise<Buffer> {
    return this.waitFor(
      () => {
        if (this.buffer.length < n) return undefined;
        const out = this.buffer.subarray(0, n);
        this.buffer = this.buffer.subarray(n);
        return out;
      },
      ms,
      what,
    );
  }

  /** Everything up to and including `delimiter`. */
  readUntil(delimiter: string, ms = 5_000): Promise<Buffer> {
    return this.waitFor(
      () => {
        const at = this.buffer.indexOf(delimiter);
        if (at < 0) return undefined;
        const out = this.buffer.subarray(0, at + delimiter.length);
        this.buffer = this.buffer.subarray(at + delimiter.length);
        return out;
      },
      ms,
      JSON.stringify(delimiter),
    );
  }

  /** Resolves with whatever arrived once the peer ends; rejects if it stays open past `ms`. */
  async readToEnd(ms = 5_000): Promise<Buffer> {
    const deadline = Date.now() + ms;
    while (!this.ended) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`peer did not close within ${ms} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.wake = undefined;
    }
    const out = this.buffer;
    this.buffer = Buffer.alloc(0);
    return out;
  }

  destroy(): void {
    this.socket.destroy();
  }
}

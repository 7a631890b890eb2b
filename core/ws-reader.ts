/**
 * Reading a WebSocket (RFC 6455 section 5) as the ws transport speaks it:
 * binary messages of at most 65535 bytes, no extensions.
 *
 *   bytes --> [HEAD: a client reads the server's response head first]
 *         --> [FRAME: 2-14 header bytes, then the payload, unmasked in place]
 *         --> message(data) | control(opcode, payload) | violation(code, why)
 *
 * It is fed in one of two ways, as the tcp transport's RecordReader is:
 * - `readBuffer()` / `wrote(n)`: the socket reads into memory this reader
 *   hands out (net.Socket's `onread`), sized from the frame headers it has
 *   seen, so the kernel copies each frame into the memory it is delivered
 *   in and a whole message is a view of it (core/record-memory.ts). Only a
 *   frame that starts too late in one piece of memory to fit is moved, once.
 * - `push(chunk)`: chunks a socket read into its own memory (an accepted
 *   socket's or a TLS socket's 'data'); they are copied into the same
 *   memory. A 64 KiB record spans two of Node's 64 KiB reads anyway, so that
 *   copy is the one any reader of such a socket makes.
 *
 * What the peer may send: final binary frames; a message in fragments
 * (continuation frames, reassembled into memory of its own); text messages,
 * which are dropped; ping, pong and close frames, between fragments too.
 * Anything else breaks the protocol and stops the reader with the close
 * code to answer with: reserved bits (no extension was agreed), unknown
 * opcodes, a fragmented or long control frame, a frame masked the wrong way
 * (a client must mask, a server must not), a continuation outside a
 * message, a new message inside one, a message longer than 65535 bytes
 * (1009). Memory per reader: one piece of record memory (64 KiB and two
 * headers), plus at most one message being reassembled (< 64 KiB), plus,
 * before release(), what one read brought: nothing grows with what a peer sends.
 */
import { carryIntoFresh, recordDelivered, retireRecordMemory } from './record-memory.ts';
import { maskInPlace } from './ws-mask.ts';

export const OP_CONTINUATION = 0x0;
export const OP_TEXT = 0x1;
export const OP_BINARY = 0x2;
export const OP_CLOSE = 0x8;
export const OP_PING = 0x9;
export const OP_PONG = 0xa;
/** Close codes (RFC 6455 section 7.4.1). */
export const CLOSE_NORMAL = 1000;
export const CLOSE_PROTOCOL_ERROR = 1002;
export const CLOSE_TOO_BIG = 1009;
/** The longest message this transport carries: one record. */
export const MAX_MESSAGE = 0xffff;
/** The longest frame header: 2 bytes, a 64-bit length, a mask key. */
export const MAX_FRAME_HEADER = 14;
/** A response head longer than this is not a WebSocket server's answer. */
export const MAX_HEAD = 16 * 1024;

/** Memory for reads: the largest frame and the header after it, however the kernel splits the reads. */
const FRESH_READ = MAX_FRAME_HEADER + MAX_MESSAGE + MAX_FRAME_HEADER;
/** Room asked for while a frame's length is not known yet. */
const MIN_ROOM = 4096;
const NO_MEMORY = Buffer.alloc(0);
/** Where a stopped reader's socket reads what is then thrown away. */
const discard = Buffer.allocUnsafeSlow(64 * 1024);
const HEAD_END = Buffer.from('\r\n\r\n', 'latin1');

const HEAD = 0;
const FRAMES = 1;
const STOPPED = 2;

export interface WsReaderEvents {
  /**
   * The response head (the text before its blank line), for a reader made
   * with `head`. Return false to stop: nothing more is delivered.
   */
  head?(head: string): boolean;
  /**
   * A whole binary message, unmasked. The receiver's to keep and write into;
   * a view of record memory, so the receiver vouches for it as for a tcp
   * link's record (core/record-memory.ts), or leaves it to the collector.
   */
  message(data: Buffer): void;
  /** A ping, pong or close frame; `payload` (at most 125 bytes) is valid only during the call. */
  control(opcode: number, payload: Buffer): void;
  /** The peer broke the protocol: the close code to answer with, and why. The reader has stopped. */
  violation(code: number, why: string): void;
}

export class WsFrameReader {
  private phase: number;
  /** While held, frames wait (in memory, or as chunks pushed) until release(). */
  private held = false;
  private heldChunks: Buffer[] = [];
  /** The memory reads land in, its filled length, and the first byte not yet parsed. */
  private memory: Buffer = NO_MEMORY;
  private end = 0;
  private at = 0;
  /** The fragments of a message being reassembled (copies), its size so far, and whether it is binary. */
  private parts: Buffer[] | null = null;
  private partsBytes = 0;
  private partsBinary = false;

  /**
   * `masked`: every frame must carry a mask key (a server reads a client);
   * else none may. `head`: a response head comes first (a client).
   */
  constructor(
    private readonly masked: boolean,
    private readonly events: WsReaderEvents,
    head = false,
  ) {
    this.phase = head ? HEAD : FRAMES;
  }

  /** Deliver no frames until release(); the head, if any, is still read. */
  hold(): void {
    this.held = true;
  }

  /** Deliver what waited, then go on as data comes. */
  release(): void {
    if (!this.held) return;
    this.held = false;
    this.parse();
    const chunks = this.heldChunks;
    this.heldChunks = [];
    for (const chunk of chunks) this.push(chunk);
  }

  /** Deliver nothing more; what still comes is read and discarded. */
  stop(): void {
    this.phase = STOPPED;
    this.parts = null;
    this.heldChunks = [];
    // Back to the pool once the messages delivered from it are vouched for.
    retireRecordMemory(this.memory);
    this.memory = NO_MEMORY;
    this.at = this.end = 0;
  }

  get stopped(): boolean {
    return this.phase === STOPPED;
  }

  /** Bytes the socket read into its own memory. */
  push(chunk: Buffer): void {
    if (this.phase === STOPPED) return;
    if (this.held && this.phase === FRAMES) {
      this.heldChunks.push(chunk);
      return;
    }
    for (let from = 0; from < chunk.length; ) {
      const into = this.readBuffer();
      const n = chunk.copy(into, 0, from);
      from += n;
      this.wrote(n);
      if (this.phase === STOPPED) return;
      if (this.held && this.phase === FRAMES && from < chunk.length) {
        this.heldChunks.push(chunk.subarray(from));
        return;
      }
    }
  }

  /**
   * Where the socket should read next: the unwritten rest of the current
   * memory, with room for the frame being read and the next header. The
   * reader never writes into memory it has handed out as a message.
   */
  readBuffer(): Buffer {
    // Discarding: memory no message was ever delivered from, shared, read over and over.
    if (this.phase === STOPPED) return discard;
    if (this.at + this.room() > this.memory.length) {
      this.memory = carryIntoFresh(this.memory, this.at, this.end, FRESH_READ);
      this.end -= this.at;
      this.at = 0;
    }
    return this.memory.subarray(this.end);
  }

  /** The socket put `n` bytes at the start of the last readBuffer(). */
  wrote(n: number): void {
    if (this.phase === STOPPED) return;
    this.end += n;
    this.parse();
  }

  /** Bytes the data from `at` needs: the frame there (or the head) and the header after it. */
  private room(): number {
    if (this.phase === HEAD) return MAX_HEAD;
    const m = this.memory;
    const at = this.at;
    const have = this.end - at;
    if (have < 2) return MIN_ROOM;
    const len7 = m[at + 1]! & 0x7f;
    const header = headerLength(m[at + 1]!);
    if (have < header) return MIN_ROOM;
    const length = len7 < 126 ? len7 : len7 === 126 ? m.readUInt16BE(at + 2) : MAX_MESSAGE;
    return Math.max(MIN_ROOM, header + Math.min(length, MAX_MESSAGE) + MAX_FRAME_HEADER);
  }

  private parse(): void {
    for (;;) {
      if (this.phase === STOPPED) return;
      const m = this.memory;
      const at = this.at;
      const have = this.end - at;
      if (this.phase === HEAD) {
        const found = m.subarray(at, this.end).indexOf(HEAD_END);
        if (found < 0) {
          if (have > MAX_HEAD) this.violate(CLOSE_PROTOCOL_ERROR, `a response head longer than ${MAX_HEAD} bytes`);
          return;
        }
        const head = m.toString('latin1', at, at + found);
        this.at = at + found + HEAD_END.length;
        this.phase = FRAMES;
        if (this.events.head?.(head) === false) this.stop();
        continue;
      }
      if (this.held || have < 2) return;
      const b0 = m[at]!;
      const b1 = m[at + 1]!;
      const fin = (b0 & 0x80) !== 0;
      const opcode = b0 & 0x0f;
      if ((b0 & 0x70) !== 0) return this.violate(CLOSE_PROTOCOL_ERROR, 'a frame with reserved bits set (no extension was agreed)');
      if (((b1 & 0x80) !== 0) !== this.masked) {
        return this.violate(CLOSE_PROTOCOL_ERROR, this.masked ? 'an unmasked frame from a client' : 'a masked frame from a server');
      }
      const len7 = b1 & 0x7f;
      if (opcode >= OP_CLOSE) {
        if (opcode > OP_PONG) return this.violate(CLOSE_PROTOCOL_ERROR, `a frame with the unknown opcode ${opcode}`);
        if (!fin || len7 > 125) return this.violate(CLOSE_PROTOCOL_ERROR, 'a control frame in fragments or longer than 125 bytes');
      } else if (opcode > OP_BINARY) {
        return this.violate(CLOSE_PROTOCOL_ERROR, `a frame with the unknown opcode ${opcode}`);
      }
      const header = headerLength(b1);
      if (have < header) return;
      let length = len7;
      if (len7 === 126) length = m.readUInt16BE(at + 2);
      else if (len7 === 127) length = m.readUInt32BE(at + 2) === 0 ? m.readUInt32BE(at + 6) : Infinity;
      if (length > MAX_MESSAGE) return this.violate(CLOSE_TOO_BIG, `a frame of more than ${MAX_MESSAGE} bytes`);
      if (have < header + length) return;
      const start = at + header;
      const payload = m.subarray(start, start + length);
      if (this.masked && length > 0) maskInPlace(payload, m.subarray(start - 4, start));
      this.at = start + length;

      if (opcode >= OP_CLOSE) {
        this.events.control(opcode, payload);
      } else if (opcode === OP_CONTINUATION) {
        const parts = this.parts;
        if (parts === null) return this.violate(CLOSE_PROTOCOL_ERROR, 'a continuation frame outside a message');
        this.partsBytes += length;
        if (this.partsBytes > MAX_MESSAGE) return this.violate(CLOSE_TOO_BIG, `a message of more than ${MAX_MESSAGE} bytes`);
        parts.push(Buffer.from(payload));
        if (fin) {
          this.parts = null;
          if (this.partsBinary) this.events.message(Buffer.concat(parts, this.partsBytes));
        }
      } else if (this.parts !== null) {
        return this.violate(CLOSE_PROTOCOL_ERROR, 'a new message before the last one ended');
      } else if (!fin) {
        this.parts = [Buffer.from(payload)];
        this.partsBytes = length;
        this.partsBinary = opcode === OP_BINARY;
      } else if (opcode === OP_BINARY) {
        recordDelivered(payload);
        this.events.message(payload);
      }
      // A whole text message: this transport carries none, so it is dropped.
    }
  }

  private violate(code: number, why: string): void {
    this.stop();
    this.events.violation(code, why);
  }
}

/** The header's length from its second byte: the length field's size and the mask key's. */
function headerLength(b1: number): number {
  const len7 = b1 & 0x7f;
  return 2 + (len7 === 126 ? 2 : len7 === 127 ? 8 : 0) + ((b1 & 0x80) !== 0 ? 4 : 0);
}

/**
 * Write a frame header for a payload of `length` bytes at `at` of `buf`
 * (final; `key` null for an unmasked frame, else its 4 bytes follow the
 * length). Returns the header's length: 2, 4 or 8 for lengths up to
 * 65535 (the caller's room: see the ws transport's headroom).
 */
export function writeFrameHeader(buf: Buffer, at: number, opcode: number, length: number, key: Buffer | null): number {
  buf[at] = 0x80 | opcode;
  let n: number;
  if (length > 125) {
    buf[at + 1] = 126;
    buf.writeUInt16BE(length, at + 2);
    n = 4;
  } else {
    buf[at + 1] = length;
    n = 2;
  }
  if (key !== null) {
    buf[at + 1] |= 0x80;
    key.copy(buf, at + n);
    n += 4;
  }
  return n;
}

/** The header length writeFrameHeader uses for `length` bytes, masked or not. */
export function frameHeaderLength(length: number, masked: boolean): number {
  return (length > 125 ? 4 : 2) + (masked ? 4 : 0);
}

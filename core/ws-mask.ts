/**
 * RFC 6455 masking for the ws transport's WebSocket frames: a client's
 * frames get a random 4-byte key each and their payload XORed with it, in
 * place (plugins/transport-ws.ts); a server XORs them back as it reads
 * them (core/ws-reader.ts).
 *
 * The XOR runs in C when bufferutil loads (the optional addon the `ws`
 * library uses for the same job; its prebuilt binaries need no install
 * script), else in JavaScript a 32-bit word at a time. The keys come from the CSPRNG, drawn
 * 8 KiB at a time so a frame costs no system call.
 */
import { randomFillSync } from 'node:crypto';
import { createRequire } from 'node:module';

interface NativeMasker {
  mask(source: Buffer, mask: Buffer, output: Buffer, offset: number, length: number): void;
}

/** Below this many bytes the call into C costs more than the loop (ws's own threshold is 48). */
const NATIVE_FROM = 48;
const KEY_POOL_SIZE = 8192;

function loadNative(): NativeMasker | undefined {
  try {
    const masker = createRequire(import.meta.url)('bufferutil') as NativeMasker;
    return typeof masker.mask === 'function' ? masker : undefined;
  } catch {
    return undefined;
  }
}

const native = loadNative();
const keyPool = Buffer.alloc(KEY_POOL_SIZE);
let keyAt = KEY_POOL_SIZE;

/** Whether the XOR runs in C (bufferutil loaded). */
export const nativeMasking = native !== undefined;

/** Fills `key` (4 bytes) with a fresh random masking key. */
export function writeMaskKey(key: Buffer): void {
  if (keyAt === KEY_POOL_SIZE) {
    randomFillSync(keyPool);
    keyAt = 0;
  }
  keyPool.copy(key, 0, keyAt, keyAt + 4);
  keyAt += 4;
}

/** XORs `data` in place with the 4-byte `key`, repeated (RFC 6455 section 5.3). */
export function maskInPlace(data: Buffer, key: Buffer): void {
  if (native !== undefined && data.length >= NATIVE_FROM) native.mask(data, key, data, 0, data.length);
  else maskInJavaScript(data, key);
}

/**
 * The same XOR without bufferutil (`key` is the 4 bytes): exported so tests
 * check it on machines where the native one loads.
 */
export function maskInJavaScript(data: Buffer, key: Buffer): void {
  let i = 0;
  if ((data.byteOffset & 3) === 0 && data.length >= 16) {
    // Words in the machine's byte order on both sides: the XOR is the same bytewise.
    const words = new Uint32Array(data.buffer, data.byteOffset, data.length >>> 2);
    const word = new Uint32Array(new Uint8Array([key[0]!, key[1]!, key[2]!, key[3]!]).buffer)[0]!;
    for (let w = 0; w < words.length; w++) words[w]! ^= word;
    i = words.length << 2;
  }
  for (; i < data.length; i++) data[i]! ^= key[i & 3]!;
}

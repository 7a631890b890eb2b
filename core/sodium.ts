/**
 * sodium-native (libsodium), loaded once for the whole process. It ships
 * prebuilt binaries and needs no install script; where none fits the
 * platform this returns null and callers fall back to node:crypto.
 * Each caller types the part of the module it uses.
 */
import { createRequire } from 'node:module';

let loaded: unknown;
let tried = false;

export function sodiumNative<T>(): T | null {
  if (!tried) {
    tried = true;
    try {
      loaded = createRequire(import.meta.url)('sodium-native');
    } catch {
      loaded = null;
    }
  }
  return loaded as T | null;
}

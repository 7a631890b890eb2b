/**
 * HandshakeState starts from a kept state per (protocol, prologue, responder
 * key) (core/noise.ts, startSymmetric). What is kept must be what would be
 * computed: equal bytes in another buffer find it, other bytes do not, a
 * caller that changes its buffer afterwards changes nothing kept, and a
 * combination pushed out by newer ones is computed again, the same.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { HandshakeState } from '../core/noise.ts';
import { generateKeyPair, type KeyPair } from '../core/x25519.ts';
import type { CipherPlugin } from '../core/types.ts';
import chachaDef from '../plugins/cipher-chacha20-poly1305.ts';

const cipher = chachaDef.create({}, undefined as never) as CipherPlugin;
const server = generateKeyPair();
const client = generateKeyPair();
// Fixed ephemerals make a handshake's hash a function of its inputs alone.
const initiatorEphemeral = Buffer.alloc(32, 0x11);
const responderEphemeral = Buffer.alloc(32, 0x22);

/** A whole IK handshake; the handshake hash when both sides agree, null when the responder cannot read message 1. */
function handshake(initiatorPrologue: Uint8Array, responderPrologue: Uint8Array, responder: KeyPair = server): Buffer | null {
  const i = new HandshakeState({
    pattern: 'IK',
    initiator: true,
    cipher,
    hash: 'BLAKE2s',
    prologue: initiatorPrologue,
    staticKey: client,
    remoteStaticKey: responder.publicKey,
    ephemeralPrivateKey: initiatorEphemeral,
  });
  const r = new HandshakeState({
    pattern: 'IK',
    initiator: false,
    cipher,
    hash: 'BLAKE2s',
    prologue: responderPrologue,
    staticKey: responder,
    ephemeralPrivateKey: responderEphemeral,
  });
  try {
    r.readMessage(i.writeMessage(Buffer.from('one')));
  } catch {
    return null;
  }
  i.readMessage(r.writeMessage(Buffer.from('two')));
  const hash = i.handshakeHash();
  assert.ok(hash.equals(r.handshakeHash()), 'both sides end with the same handshake hash');
  return hash;
}

test('equal bytes in another buffer start from the same state; other bytes from another', () => {
  const first = handshake(Buffer.from('premessage a'), Buffer.from('premessage a'));
  const again = handshake(Buffer.from('premessage a'), Uint8Array.from(Buffer.from('premessage a')));
  assert.ok(first !== null && again !== null);
  assert.ok(first.equals(again), 'the same inputs gave another handshake hash the second time');
  const other = handshake(Buffer.from('premessage b'), Buffer.from('premessage b'));
  assert.ok(other !== null && !other.equals(first), 'another prologue gave the same handshake hash');
  assert.is(handshake(Buffer.from('premessage a'), Buffer.from('premessage b')), null, 'sides with different prologues agreed');
  const otherServer = generateKeyPair();
  const withOtherKey = handshake(Buffer.from('premessage a'), Buffer.from('premessage a'), otherServer);
  assert.ok(withOtherKey !== null && !withOtherKey.equals(first), 'another responder key gave the same handshake hash');
});

test('a caller that changes its prologue buffer afterwards changes nothing kept', () => {
  const prologue = Buffer.from('mutable one');
  const before = handshake(prologue, prologue);
  prologue.write('mutable two');
  const changed = handshake(Buffer.from('mutable two'), Buffer.from('mutable two'));
  assert.ok(before !== null && changed !== null);
  assert.ok(!changed.equals(before), 'the kept state followed the caller\'s buffer');
  const original = handshake(Buffer.from('mutable one'), Buffer.from('mutable one'));
  assert.ok(original !== null && original.equals(before), 'the first prologue no longer gives its own handshake hash');
});

test('a combination pushed out by 40 newer ones is computed again, the same', () => {
  const first = handshake(Buffer.from('evicted'), Buffer.from('evicted'));
  for (let n = 0; n < 40; n++) assert.ok(handshake(Buffer.from(`filler ${n}`), Buffer.from(`filler ${n}`)) !== null);
  const again = handshake(Buffer.from('evicted'), Buffer.from('evicted'));
  assert.ok(first !== null && again !== null && again.equals(first));
});

test.run();

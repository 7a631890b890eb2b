/**
 * X25519 runs on libsodium when sodium-native loads and on node:crypto when
 * it does not: both must compute the same function and refuse the same
 * keys, so a server on one talks to a client on the other.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { generateKeyPair, X25519_BACKEND_NAME, X25519_BACKENDS, type X25519Backend } from '../core/x25519.ts';

const hex = (s: string) => Buffer.from(s, 'hex');
const sodium = X25519_BACKENDS.libsodium;
const backends: X25519Backend[] = [X25519_BACKENDS.node, ...(sodium ? [sodium] : [])];

// RFC 7748 section 6.1.
const alice = { priv: hex('77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a'), pub: hex('8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a') };
const bob = { priv: hex('5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb'), pub: hex('de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f') };
const shared = '4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742';

test('sodium-native loads on this platform (x64 Linux has a prebuilt binary), and handshakes use it', () => {
  assert.ok(sodium !== null, 'sodium-native did not load: handshakes would fall back to node:crypto');
  assert.is(X25519_BACKEND_NAME, 'libsodium');
});

test('both implementations give the RFC 7748 shared secret', () => {
  for (const b of backends) {
    assert.is(b.dh(alice.priv, bob.pub).toString('hex'), shared, `${b.name}: alice with bob's key`);
    assert.is(b.dh(bob.priv, alice.pub).toString('hex'), shared, `${b.name}: bob with alice's key`);
  }
});

test("each implementation's ephemeral keys agree with the other's DH", () => {
  for (const maker of backends) {
    for (const checker of backends) {
      for (let i = 0; i < 20; i++) {
        const peer = generateKeyPair();
        const e = maker.generateEphemeral();
        assert.is(e.publicKey.length, 32);
        assert.ok(
          e.dh(peer.publicKey).equals(checker.dh(peer.privateKey, e.publicKey)),
          `${maker.name} ephemeral against ${checker.name} DH`,
        );
      }
    }
  }
});

test('both refuse low-order public keys and keys of the wrong length', () => {
  const lowOrder = [
    '0000000000000000000000000000000000000000000000000000000000000000',
    '0100000000000000000000000000000000000000000000000000000000000000',
    'e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800',
    'ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f',
  ];
  const own = generateKeyPair();
  for (const b of backends) {
    for (const point of lowOrder) {
      assert.throws(() => b.dh(own.privateKey, hex(point)), undefined, `${b.name}: static DH with ${point.slice(0, 8)}`);
      assert.throws(() => b.generateEphemeral().dh(hex(point)), undefined, `${b.name}: ephemeral DH with ${point.slice(0, 8)}`);
    }
    assert.throws(() => b.dh(own.privateKey, Buffer.alloc(31, 9)), (err: unknown) => err instanceof RangeError, `${b.name}: short public key`);
    assert.throws(() => b.dh(Buffer.alloc(33, 9), own.publicKey), (err: unknown) => err instanceof RangeError, `${b.name}: long private key`);
    assert.throws(() => b.generateEphemeral().dh(Buffer.alloc(31, 9)), (err: unknown) => err instanceof RangeError, `${b.name}: ephemeral, short key`);
  }
});

test.run();

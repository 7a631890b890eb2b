/**
 * The server keeps DH(server static, client static) per authorized client
 * (core/handshake.ts) and hands it to readInitiation as `known`. The kept
 * value must be the real one, must really be used, and a handshake that
 * uses it must end with the same transport keys on both sides.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { checkInitiation, initiatorFactory, jsonBytes, PROLOGUE, readResponse, writeInitiation } from '../core/handshake.ts';
import { NoiseError, readInitiation, type HandshakeState } from '../core/noise.ts';
import { ReplayGuard } from '../core/replay.ts';
import { dh, generateKeyPair } from '../core/x25519.ts';
import type { AuthPlugin, CipherPlugin } from '../core/types.ts';
import chachaDef from '../plugins/cipher-chacha20-poly1305.ts';

const cipher = chachaDef.create({}, undefined as never) as CipherPlugin;
const server = generateKeyPair();
const client = generateKeyPair();
const initiator = initiatorFactory({ cipher, hash: 'BLAKE2s', staticKey: client, serverPublicKey: server.publicKey });
const responderOpts = { cipher, hash: 'BLAKE2s' as const, prologue: PROLOGUE, staticKey: server };

/** Both sides' transport keys work together: each opens what the other sealed. */
function assertKeysAgree(clientState: HandshakeState, serverState: HandshakeState): void {
  const c = clientState.split();
  const s = serverState.split();
  const up = c.send.encryptWithAd(Buffer.alloc(0), Buffer.from('up'));
  assert.is(s.receive.decryptWithAd(Buffer.alloc(0), up)?.toString(), 'up');
  const down = s.send.encryptWithAd(Buffer.alloc(0), Buffer.from('down'));
  assert.is(c.receive.decryptWithAd(Buffer.alloc(0), down)?.toString(), 'down');
  assert.ok(c.handshakeHash.equals(s.handshakeHash));
}

test('readInitiation reports DH(server static, client static) as staticShared', () => {
  const { staticShared } = readInitiation(responderOpts, writeInitiation(initiator(), {}), ['IK', 'IKpsk2']);
  assert.ok(staticShared.equals(dh(server.privateKey, client.publicKey)));
});

test('a known static secret is used: the right one completes the handshake, a wrong one fails it', () => {
  const right = dh(server.privateKey, client.publicKey);
  const lookups: string[] = [];
  const hs = initiator();
  const { state } = readInitiation(responderOpts, writeInitiation(hs, {}), ['IK', 'IKpsk2'], (pub) => {
    lookups.push(Buffer.from(pub).toString('base64'));
    return Buffer.from(pub).equals(client.publicKey) ? right : undefined;
  });
  assert.ok(lookups.includes(client.publicKey.toString('base64')), 'the client key was looked up');
  readResponse(hs, state.writeMessage(jsonBytes({})));
  assertKeysAgree(hs, state);

  const wrong = Buffer.from(right);
  wrong[0]! ^= 1;
  assert.throws(
    () => readInitiation(responderOpts, writeInitiation(initiator(), {}), ['IK', 'IKpsk2'], (pub) => (Buffer.from(pub).equals(client.publicKey) ? wrong : undefined)),
    (err: unknown) => err instanceof NoiseError,
  );
});

test('checkInitiation: repeated handshakes of one client (the later ones from the kept secret) all complete', () => {
  const auth: AuthPlugin = {
    name: 'test',
    authorize: (key) => (key.equals(client.publicKey) ? { name: 'alice', publicKey: key.toString('base64') } : null),
    psk: () => undefined,
  };
  const ctx = { cipher, hash: 'BLAKE2s' as const, staticKey: server, auth, replay: new ReplayGuard() };
  for (let i = 0; i < 3; i++) {
    const hs = initiator();
    const init = checkInitiation(ctx, writeInitiation(hs, { round: i }));
    assert.ok(init.ok, `round ${i}: ${init.ok ? '' : init.reason}`);
    if (!init.ok) return;
    assert.equal(init.json, { round: i });
    readResponse(hs, init.state.writeMessage(jsonBytes({})));
    assertKeysAgree(hs, init.state);
  }
});

test.run();

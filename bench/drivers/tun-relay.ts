/**
 * A null TUN-over-UDP relay: the least a Node VPN does per packet, with
 * nothing of a VPN's bookkeeping. No handshake, no session, no replay
 * window, no key age, no routing, no statistics, no frames: each packet
 * read from the TUN goes out in one datagram to the one peer, and each
 * datagram's payload goes into the TUN.
 *
 *   TUN --read--> [seal] --sendto--> peer      (one thread, poll(2) on both)
 *   UDP --recvfrom--> [open] --write--> TUN
 *
 * The calls are the ones dshield's packet thread makes (koffi into libc for
 * poll, read, write, sendto and recvfrom; the system libsodium through
 * koffi for the AEAD, core/libsodium-aead.ts), so a ping through two of
 * these, beside one through dshield and one through OpenVPN, splits what
 * dshield adds into what any Node relay pays and what dshield's own work
 * costs (bench/relay-floor.ts). The keys are fixed and the nonces a plain
 * counter: it measures, it protects nothing.
 *
 *   node --import tsx tun-relay.ts ROLE TUN ADDRESS AEAD [thread] [vnet]
 *
 * ROLE is server (binds ADDRESS, answers whoever sent last) or client
 * (sends to ADDRESS); TUN the device to create; AEAD none,
 * chacha20-poly1305 or aes-256-gcm; `thread` runs the loop in a worker
 * thread and `vnet` opens the TUN with a virtio_net_hdr, as dshield does.
 * Prints READY when the device exists; runs until killed.
 */
import { constants, openSync } from 'node:fs';
import { isMainThread } from 'node:worker_threads';
import type { InPlaceAead } from '../../core/aead.ts';
import { tuneGarbageCollector } from '../../core/gc-tuning.ts';
import { loadLibsodiumAesGcm, loadLibsodiumChaCha } from '../../core/libsodium-aead.ts';
import { tuneMalloc } from '../../core/malloc-tuning.ts';
import { AF_INET, IFF_NO_PI, IFF_TUN, IFF_VNET_HDR, IFNAMSIZ, IFREQ_SIZE, POLLIN, SOCK_CLOEXEC, SOCK_DGRAM, SOCK_NONBLOCK, TUNSETIFF, libc } from '../../core/tun/libc.ts';
import { startTsWorker } from '../../core/tun/ts-worker.ts';
import { VNET_HDR_LEN } from '../../core/tun/tcp-coalesce.ts';
import { sockaddrIn, udpIoOnFd } from '../../core/udp-io.ts';

const [role, tunName, address, cipher, ...options] = process.argv.slice(2);
if ((role !== 'server' && role !== 'client') || !tunName || !address || !cipher) {
  console.error('usage: tun-relay.ts server|client TUN HOST:PORT none|chacha20-poly1305|aes-256-gcm [thread] [vnet]');
  process.exit(2);
}

/** The datagram's header: the nonce's counter, also the AEAD's associated data. */
const HEADER = 8;
const TAG = 16;

function aeadFor(name: string): InPlaceAead | null {
  if (name === 'none') return null;
  const aead = name === 'aes-256-gcm' ? loadLibsodiumAesGcm() : name === 'chacha20-poly1305' ? loadLibsodiumChaCha() : null;
  if (aead === null) throw new Error(`no ${name} from the system libsodium here`);
  return aead;
}

function openTun(name: string, vnet: boolean): number {
  const fd = openSync('/dev/net/tun', constants.O_RDWR | constants.O_NONBLOCK);
  const req = Buffer.alloc(IFREQ_SIZE);
  req.write(name, 0, IFNAMSIZ - 1, 'latin1');
  req.writeUInt16LE(IFF_TUN | IFF_NO_PI | (vnet ? IFF_VNET_HDR : 0), IFNAMSIZ);
  const c = libc();
  if (c.ioctlPtr(fd, TUNSETIFF, req) < 0) throw new Error(`TUNSETIFF ${name}: ${c.errnoName(c.errno())}`);
  return fd;
}

function hostPort(text: string): Buffer {
  const colon = text.lastIndexOf(':');
  const sa = sockaddrIn(text.slice(0, colon), Number(text.slice(colon + 1)));
  if (sa === undefined) throw new Error(`not an IPv4 HOST:PORT: ${text}`);
  return sa;
}

function relay(server: boolean, tun: number, vnet: boolean, aead: InPlaceAead | null): never {
  const c = libc();
  const fd = c.socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  const far = hostPort(address!);
  if (server && c.bind(fd, far, far.length) < 0) throw new Error(`bind ${address}: ${c.errnoName(c.errno())}`);
  const udp = udpIoOnFd(fd);
  if (udp === undefined) throw new Error('no direct UDP I/O here');
  let peer: Buffer | undefined = server ? undefined : far;
  let peerText = '';
  const tag = aead === null ? 0 : TAG;
  // Each direction its own key, so no nonce is used twice under one.
  const [sendKey, receiveKey] = server ? [Buffer.alloc(32, 2), Buffer.alloc(32, 1)] : [Buffer.alloc(32, 1), Buffer.alloc(32, 2)];
  // A packet starts at `body` in both buffers; a vnet header, when the device has one, sits right before it.
  const vh = vnet ? VNET_HDR_LEN : 0;
  const body = vnet ? 16 : HEADER;
  const tx = Buffer.allocUnsafe(65536);
  const rx = Buffer.allocUnsafe(65536);
  const txHeader = tx.subarray(0, HEADER);
  const rxHeader = rx.subarray(0, HEADER);
  const txFrame = tx.subarray(body - vh);
  const rxFrame = rx.subarray(body - vh);
  const fds = new Uint8Array(16);
  const view = new DataView(fds.buffer);
  view.setInt32(0, tun, true);
  view.setInt16(4, POLLIN, true);
  view.setInt32(8, fd, true);
  view.setInt16(12, POLLIN, true);
  let counter = 0;
  console.log('READY');
  for (;;) {
    if (c.poll(fds, 2, -1) < 0) continue;
    if (view.getInt16(6, true) !== 0) {
      const n = c.read(tun, txFrame, txFrame.length - tag) - vh;
      if (n > 0 && peer !== undefined) {
        tx.writeUInt32LE(counter >>> 0, 0);
        tx.writeUInt32LE(Math.floor(counter / 0x1_0000_0000), 4);
        if (aead !== null) aead.encryptInto(sendKey, counter, txHeader, tx.subarray(body, body + n), tx.subarray(body, body + n + tag));
        counter++;
        udp.send(tx.subarray(0, body + n + tag), peer);
      }
    }
    if (view.getInt16(14, true) !== 0) {
      const n = udp.receive(rx);
      if (n < body + tag) continue;
      if (server && udp.from !== peerText) {
        peerText = udp.from;
        peer = hostPort(peerText);
      }
      const nonce = rx.readUInt32LE(0) + rx.readUInt32LE(4) * 0x1_0000_0000;
      if (aead !== null && !aead.decryptInto(receiveKey, nonce, rxHeader, rx.subarray(body, n), rx.subarray(body, n - tag))) continue;
      if (vnet) rx.fill(0, body - vh, body); // a header that asks nothing of the kernel
      c.write(tun, rxFrame, n - tag - body + vh);
    }
  }
}

// The process as dshield's CLI sets it up: without this, a loop that never returns to an
// event loop leaves a marking cycle unfinished and V8's helper threads busy on every ping.
if (isMainThread) {
  tuneGarbageCollector();
  tuneMalloc();
}
const inThread = options.includes('thread');
const vnet = options.includes('vnet');
if (isMainThread && inThread) {
  // The loop runs in a worker, as dshield's does; this thread idles in the event loop.
  startTsWorker(new URL(import.meta.url), { argv: process.argv.slice(2) }).on('error', (err) => {
    console.error(err instanceof Error ? err.message : String(err));
    process.exit(1);
  });
} else {
  const tun = openTun(tunName, vnet);
  relay(role === 'server', tun, vnet, aeadFor(cipher));
}

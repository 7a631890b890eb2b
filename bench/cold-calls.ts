/**
 * What one call on a packet thread's path costs when it is the first after
 * 10 ms of idle, with the CPU's caches as they were and with them evicted,
 * beside the same syscalls made from C.
 *
 *   npx tsx bench/cold-calls.ts        (Linux; the C rows need `cc`)
 *
 * Why: a ping through dshield's TUN mode costs each process some 55-60 µs
 * more CPU than OpenVPN's, spread over its steps, and every step was 5-10×
 * slower than the same step run a moment after another. Between two pings
 * the CPU runs ping, the other VPN process and the kernel's forwarding, so
 * the caches a packet's code needs are partly gone. This times each kind of
 * step the thread takes (a syscall through koffi, the AEAD call by each
 * path the cipher plugins have, a call into N-API that does nothing, Buffer
 * views) as the first thing after 10 ms asleep in poll(2), once as it is
 * and once after walking 8 MiB of memory, which evicts the caches as other
 * work would. The C rows are the same syscalls and the same AEAD libraries
 * with nothing between the program and them: what a C VPN pays in the same
 * state.
 *
 * Not part of `npm run bench`: it compares no systems and has no target;
 * the README's "Where it falls short" quotes it. Traffic: one UDP socket on
 * 127.0.0.1 sending to itself. Every loop is bounded by ROUNDS.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import type { InPlaceAead } from '../core/aead.ts';
import { loadLibsodiumAesGcm, loadLibsodiumChaCha } from '../core/libsodium-aead.ts';
import { loadOpenSslAesGcm, loadOpenSslChaCha } from '../core/openssl-aead.ts';
import { loadSodiumChaCha } from '../core/sodium-aead.ts';
import { sodiumNative } from '../core/sodium.ts';
import { AF_INET, SOCK_CLOEXEC, SOCK_DGRAM, SOCK_NONBLOCK, libc } from '../core/tun/libc.ts';
import { sockaddrIn, udpIoOnFd } from '../core/udp-io.ts';

const ROUNDS = Number(process.env.DSHIELD_COLD_ROUNDS ?? 300);
const IDLE_MS = 10;
const EVICT_MIB = 8;
const WARM_CALLS = 5000;
/** A ping's IPv4 packet in a DATA record: what the thread seals and sends. */
const PACKET = 84;

interface Step {
  name: string;
  /** Runs before the idle wait, untimed (queues the datagram a receive reads). */
  prepare?: () => void;
  run: () => void;
  /** Runs after the timed call, untimed (reads back the datagram a send queued). */
  after?: () => void;
}

function nodeSteps(): { steps: Step[]; close(): void } {
  const c = libc();
  const fd = c.socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  const self = sockaddrIn('127.0.0.1', 0)!;
  if (fd < 0 || c.bind(fd, self, self.length) < 0 || c.getsockname(fd, self, new Uint32Array([self.length])) < 0) {
    throw new Error(`no UDP socket on 127.0.0.1: ${c.errnoName(c.errno())}`);
  }
  const udp = udpIoOnFd(fd);
  const aead = loadSodiumChaCha();
  const aesGcm = loadOpenSslAesGcm();
  const openSslChaCha = loadOpenSslChaCha();
  // Where no system libsodium is installed, its rows are left out.
  const systemChaCha = loadLibsodiumChaCha();
  const systemAesGcm = loadLibsodiumAesGcm();
  const sodium = sodiumNative<{ sodium_memzero(b: Uint8Array): void }>();
  if (udp === undefined || aead === null || aesGcm === null || openSslChaCha === null || sodium === null) throw new Error('koffi or sodium-native is missing (npm ci)');
  const buf = Buffer.alloc(65536);
  const key = Buffer.alloc(32, 7);
  const small = Buffer.alloc(16);
  const send = (): void => {
    if (udp.send(buf.subarray(0, PACKET), self) !== 0) throw new Error('sendto to 127.0.0.1 failed');
  };
  const receive = (): void => {
    if (udp.receive(buf) !== PACKET) throw new Error('the datagram sent to 127.0.0.1 did not arrive');
  };
  const seal = (cipher: InPlaceAead) => (): void => cipher.encryptInto(key, 1, buf.subarray(0, 13), buf.subarray(13, 13 + PACKET), buf.subarray(13, 13 + PACKET + 16));
  const steps: Step[] = [
    { name: 'sendto(2) through koffi', run: send, after: receive },
    { name: 'recvfrom(2) through koffi', prepare: send, run: receive },
    { name: 'poll(2) through koffi, nothing ready', run: () => void c.poll(small, 0, 0) },
    { name: 'sealing 84 bytes, ChaCha20-Poly1305 through sodium-native', run: seal(aead) },
    ...(systemChaCha ? [{ name: 'sealing 84 bytes, ChaCha20-Poly1305 through koffi (system libsodium)', run: seal(systemChaCha) }] : []),
    { name: 'sealing 84 bytes, ChaCha20-Poly1305 through OpenSSL and koffi (5 calls)', run: seal(openSslChaCha) },
    ...(systemAesGcm ? [{ name: 'sealing 84 bytes, AES-256-GCM through koffi (system libsodium)', run: seal(systemAesGcm) }] : []),
    { name: 'sealing 84 bytes, AES-256-GCM through OpenSSL and koffi (5 calls)', run: seal(aesGcm) },
    { name: 'an N-API call that does nothing (sodium_memzero, 16 B)', run: () => sodium.sodium_memzero(small) },
    { name: 'three Buffer views (subarray)', run: () => void (buf.subarray(1, 50), buf.subarray(2, 60), buf.subarray(3, 70)) },
    { name: 'performance.now()', run: () => void performance.now() },
  ];
  return { steps, close: () => void c.close(fd) };
}

const evictBuffer = Buffer.alloc(EVICT_MIB << 20);
/** Write to every cache line of 8 MiB, as the work between two pings would (more than this VM's L2, a share of its L3). */
function evict(): void {
  for (let i = 0; i < evictBuffer.length; i += 64) evictBuffer[i]++;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[sorted.length >> 1]!;
}

/** Median µs of each step as the first call after IDLE_MS asleep, with and without eviction. */
function measureNode(steps: Step[]): Map<string, [number, number]> {
  const c = libc();
  const idle = new Uint8Array(8);
  for (let i = 0; i < WARM_CALLS; i++) for (const s of steps) (s.prepare?.(), s.run(), s.after?.());
  const times = new Map(steps.map((s) => [s.name, [[], []] as [number[], number[]]]));
  for (let round = 0; round < ROUNDS * 2; round++) {
    const step = steps[(round >> 1) % steps.length]!;
    const evicted = round & 1;
    step.prepare?.();
    c.poll(idle, 0, IDLE_MS);
    if (evicted) evict();
    const t0 = performance.now();
    step.run();
    times.get(step.name)![evicted]!.push((performance.now() - t0) * 1000);
    step.after?.();
  }
  return new Map([...times].map(([name, [asIs, evicted]]) => [name, [median(asIs), median(evicted)]]));
}

/** The same syscalls from C, where a compiler is; null where none is. */
function measureC(): Map<string, [number, number]> | null {
  if (spawnSync('cc', ['--version']).status !== 0) return null;
  const dir = mkdtempSync(join(tmpdir(), 'dshield-cold-'));
  try {
    writeFileSync(join(dir, 'cold.c'), C_SOURCE);
    execFileSync('cc', ['-O2', '-o', join(dir, 'cold'), join(dir, 'cold.c'), '-ldl']);
    const out = execFileSync(join(dir, 'cold'), [String(ROUNDS), String(IDLE_MS), String(EVICT_MIB)], { encoding: 'utf8', timeout: 120_000 });
    const rows = new Map<string, [number, number]>();
    for (const line of out.trim().split('\n')) {
      const [name, asIs, evicted] = line.split('\t');
      rows.set(name!, [Number(asIs), Number(evicted)]);
    }
    return rows;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Each step as the first after idle_ms in poll, half the rounds after
 * evicting; prints "name\tµs\tµs evicted". The AEAD rows call the shared
 * libraries a C VPN would (libsodium, which shadowsocks-libev brings;
 * OpenSSL's libcrypto, as OpenVPN does: a keyed context, then a new IV per
 * packet), loaded with dlopen so no headers are needed; a library that is
 * not there leaves its row out.
 */
const C_SOURCE = String.raw`
#include <arpa/inet.h>
#include <dlfcn.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#define PACKET 84
static double us(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }
static int cmp(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y; }
static double median(double *v, int n) { qsort(v, n, sizeof *v, cmp); return v[n / 2]; }
static unsigned char buf[65536], key[32], nonce[12];
static struct sockaddr_in self, from;
static socklen_t len;
static int fd;
static void do_send(void) { sendto(fd, buf, PACKET, 0, (void *)&self, sizeof self); }
static void do_receive(void) { len = sizeof from; if (recvfrom(fd, buf, sizeof buf, 0, (void *)&from, &len) != PACKET) exit(2); }
static void do_poll(void) { poll(NULL, 0, 0); }
static int (*sodium_seal)(unsigned char *, unsigned long long *, const unsigned char *, unsigned long long, const unsigned char *, unsigned long long, const unsigned char *, const unsigned char *, const unsigned char *);
static void do_sodium(void) { sodium_seal(buf + 13, NULL, buf + 13, PACKET, buf, 13, NULL, nonce, key); }
static int (*evp_init)(void *, const void *, void *, const unsigned char *, const unsigned char *);
static int (*evp_update)(void *, unsigned char *, int *, const unsigned char *, int);
static int (*evp_final)(void *, unsigned char *, int *);
static int (*evp_ctrl)(void *, int, int, void *);
static void *chacha_ctx, *gcm_ctx;
static void evp_seal(void *ctx) {
  int n;
  if (evp_init(ctx, NULL, NULL, NULL, nonce) != 1 || evp_update(ctx, NULL, &n, buf, 13) != 1 || evp_update(ctx, buf + 13, &n, buf + 13, PACKET) != 1 ||
      evp_final(ctx, buf + 13 + PACKET, &n) != 1 || evp_ctrl(ctx, 0x10 /* EVP_CTRL_AEAD_GET_TAG */, 16, buf + 13 + PACKET) != 1) exit(3);
}
static void do_chacha(void) { evp_seal(chacha_ctx); }
static void do_gcm(void) { evp_seal(gcm_ctx); }
struct step { const char *name; void (*prepare)(void), (*run)(void), (*after)(void); };
int main(int argc, char **argv) {
  int rounds = atoi(argv[1]), idle = atoi(argv[2]); size_t evict = (size_t)atoi(argv[3]) << 20;
  volatile unsigned char *junk = calloc(1, evict);
  len = sizeof self;
  fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
  self.sin_family = AF_INET; self.sin_addr.s_addr = htonl(0x7f000001);
  if (fd < 0 || bind(fd, (void *)&self, sizeof self) || getsockname(fd, (void *)&self, &len)) return 1;
  struct step steps[6] = {
    {"sendto(2) from C", NULL, do_send, do_receive},
    {"recvfrom(2) from C", do_send, do_receive, NULL},
    {"poll(2) from C, nothing ready", NULL, do_poll, NULL},
  };
  int count = 3;
  void *sodium = dlopen("libsodium.so.23", RTLD_NOW);
  int (*sodium_init)(void) = sodium ? (int (*)(void))dlsym(sodium, "sodium_init") : NULL;
  sodium_seal = sodium ? dlsym(sodium, "crypto_aead_chacha20poly1305_ietf_encrypt") : NULL;
  if (sodium_init && sodium_seal && sodium_init() >= 0) steps[count++] = (struct step){"sealing 84 bytes, ChaCha20-Poly1305 from C (libsodium)", NULL, do_sodium, NULL};
  void *crypto = dlopen("libcrypto.so.3", RTLD_NOW);
  void *(*ctx_new)(void) = crypto ? (void *(*)(void))dlsym(crypto, "EVP_CIPHER_CTX_new") : NULL;
  const void *(*chacha)(void) = crypto ? (const void *(*)(void))dlsym(crypto, "EVP_chacha20_poly1305") : NULL;
  const void *(*gcm)(void) = crypto ? (const void *(*)(void))dlsym(crypto, "EVP_aes_256_gcm") : NULL;
  evp_init = crypto ? dlsym(crypto, "EVP_EncryptInit_ex") : NULL;
  evp_update = crypto ? dlsym(crypto, "EVP_EncryptUpdate") : NULL;
  evp_final = crypto ? dlsym(crypto, "EVP_EncryptFinal_ex") : NULL;
  evp_ctrl = crypto ? dlsym(crypto, "EVP_CIPHER_CTX_ctrl") : NULL;
  if (ctx_new && chacha && gcm && evp_init && evp_update && evp_final && evp_ctrl) {
    chacha_ctx = ctx_new(); gcm_ctx = ctx_new();
    if (evp_init(chacha_ctx, chacha(), NULL, key, NULL) == 1 && evp_init(gcm_ctx, gcm(), NULL, key, NULL) == 1) {
      steps[count++] = (struct step){"sealing 84 bytes, ChaCha20-Poly1305 from C (OpenSSL, 5 calls)", NULL, do_chacha, NULL};
      steps[count++] = (struct step){"sealing 84 bytes, AES-256-GCM from C (OpenSSL, 5 calls)", NULL, do_gcm, NULL};
    }
  }
  double *t[6][2]; int n[6][2] = {{0}};
  for (int s = 0; s < count; s++) for (int e = 0; e < 2; e++) t[s][e] = calloc(rounds, sizeof(double));
  for (int i = 0; i < 5000; i++) for (int s = 0; s < count; s++) {
    if (steps[s].prepare) steps[s].prepare();
    steps[s].run();
    if (steps[s].after) steps[s].after();
  }
  for (int round = 0; round < rounds * 2 * count; round++) {
    int s = (round >> 1) % count, e = round & 1;
    if (steps[s].prepare) steps[s].prepare();
    poll(NULL, 0, idle);
    if (e) for (size_t i = 0; i < evict; i += 64) junk[i]++;
    double t0 = us();
    steps[s].run();
    t[s][e][n[s][e]++] = us() - t0;
    if (steps[s].after) steps[s].after();
  }
  for (int s = 0; s < count; s++) printf("%s\t%.2f\t%.2f\n", steps[s].name, median(t[s][0], n[s][0]), median(t[s][1], n[s][1]));
  return 0;
}
`;

const { steps, close } = nodeSteps();
let node: Map<string, [number, number]>;
try {
  node = measureNode(steps);
} finally {
  close();
}
const c = measureC();
console.log(`Each step as the first call after ${IDLE_MS} ms asleep in poll(2), median of ${ROUNDS} each, in µs:`);
console.log(`| step | caches as they were | after evicting ${EVICT_MIB} MiB |`);
console.log('|---|---|---|');
for (const [name, [asIs, evicted]] of [...node, ...(c ?? [])]) console.log(`| ${name} | ${asIs.toFixed(1)} | ${evicted.toFixed(1)} |`);
if (c === null) console.log('(no C compiler here: `cc` not found, so no C rows)');

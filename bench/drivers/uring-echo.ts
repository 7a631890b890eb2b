/**
 * A UDP echo that waits, receives and sends through io_uring, for the
 * relay-hop floor (bench/hop-floor.ts): what a Node relay would gain by
 * crossing into the kernel fewer times per packet.
 *
 *   io_uring_enter(wait) --> the datagram is already received (RECVMSG)
 *   io_uring_enter(submit SENDMSG back + the next RECVMSG, wait) --> ...
 *
 * Two crossings from JavaScript into native code per datagram, where the
 * loop echo (udp-hop.ts `loop`) makes four: poll, recvfrom, sendto, and the
 * recvfrom that finds the socket empty. The send completes inside the
 * submitting call and posts nothing (IOSQE_CQE_SKIP_SUCCESS), so the same
 * call goes on to sleep until the next datagram; the next receive is linked
 * behind it (IOSQE_IO_LINK), so it never fills the buffer being sent. With
 * DEFER_TASKRUN the kernel finishes the receive's work only inside that
 * wait, in this thread.
 *
 * Bench code only: it needs Linux 6.1 or later with io_uring allowed
 * (`kernel.io_uring_disabled` 0) and lays out the structures of 64-bit
 * little-endian Linux; where it cannot run, `uringEcho` says why and the
 * row is skipped.
 */
import { createRequire } from 'node:module';

type Koffi = typeof import('koffi');

/** Syscall numbers shared by every Linux architecture since 5.1. */
const SYS_IO_URING_SETUP = 425;
const SYS_IO_URING_ENTER = 426;
const IORING_SETUP_SINGLE_ISSUER = 1 << 12;
const IORING_SETUP_DEFER_TASKRUN = 1 << 13;
const IORING_FEAT_SINGLE_MMAP = 1 << 0;
const IORING_FEAT_CQE_SKIP = 1 << 11;
const IORING_ENTER_GETEVENTS = 1;
const IORING_OFF_SQES = 0x1000_0000;
const IORING_OP_SENDMSG = 9;
const IORING_OP_RECVMSG = 10;
const IOSQE_IO_LINK = 1 << 2;
const IOSQE_CQE_SKIP_SUCCESS = 1 << 6;
const SQE_SIZE = 64;
const CQE_SIZE = 16;
const PROT_READ_WRITE = 0x3;
const MAP_SHARED = 0x01;
const MAP_PRIVATE = 0x02;
const MAP_ANONYMOUS = 0x20;
const MAP_POPULATE = 0x8000;
/** mmap's (void *) -1. */
const MAP_FAILED = 0xffff_ffff_ffff_ffffn;
const EINTR = 4;
const ENTRIES = 8;
/** struct io_uring_params: 40 bytes of fields, then io_sqring_offsets and io_cqring_offsets (40 bytes each). */
const PARAMS_SIZE = 120;
/** Word indexes into io_uring_params. */
const P_SQ_ENTRIES = 0;
const P_CQ_ENTRIES = 1;
const P_FLAGS = 2;
const P_FEATURES = 5;
const P_SQ_OFF = 10;
const P_CQ_OFF = 20;
/** Word indexes within io_sqring_offsets / io_cqring_offsets. */
const OFF_HEAD = 0;
const OFF_TAIL = 1;
const OFF_RING_MASK = 2;
const SQ_OFF_ARRAY = 6;
const CQ_OFF_CQES = 5;

/** The echo's own memory, one anonymous mapping: two struct msghdr, their iovecs, the sender's address, the datagram. */
const RECV_MSG = 0;
const SEND_MSG = 64;
const RECV_IOV = 128;
const SEND_IOV = 144;
const PEER = 160;
const DATA = 256;
const DATA_SIZE = 2048;
const MEMORY_SIZE = DATA + DATA_SIZE;
const SOCKADDR_IN_SIZE = 16;
/** user_data of each kind of request (its low 32 bits are read back from a CQE). */
const RECEIVED = 1;
const SENT = 2;

/** Why io_uring cannot carry the echo here, or null when it can: checked before anything is set up. */
export function uringUnavailable(): string | null {
  if (process.platform !== 'linux') return `io_uring is Linux's (this is ${process.platform})`;
  if (process.arch !== 'x64' && process.arch !== 'arm64') return `the echo lays out 64-bit little-endian structures (this is ${process.arch})`;
  return null;
}

/**
 * Echo every datagram on the bound, non-blocking UDP socket `fd` back to
 * its sender, forever. Calls `ready` once the first receive is queued, or
 * throws an Error saying why io_uring cannot be used here.
 */
export function uringEcho(fd: number, ready: () => void): never {
  const koffi = createRequire(import.meta.url)('koffi') as Koffi;
  const lib = koffi.load('libc.so.6');
  const setup = lib.func('syscall', 'long', ['long', 'uint', 'void *']);
  const enter = lib.func('syscall', 'long', ['long', 'int', 'uint', 'uint', 'uint', 'void *', 'ulong']);
  const mmapCall = lib.func('void *mmap(void *addr, unsigned long len, int prot, int flags, int fd, long off)');
  /** mmap(2) of `length` bytes viewed as an ArrayBuffer, and its address; throws where the kernel refused it (MAP_FAILED). */
  const map = (length: number, flags: number, mapFd: number, offset: number): { memory: ArrayBuffer; address: bigint } => {
    const pointer = mmapCall(null, length, PROT_READ_WRITE, flags, mapFd, offset);
    const address = koffi.address(pointer) as bigint;
    if (address === MAP_FAILED) throw new Error(`mmap of ${length} bytes failed (errno ${koffi.errno()})`);
    return { memory: koffi.view(pointer, length), address };
  };

  const params = new Uint32Array(PARAMS_SIZE / 4);
  params[P_FLAGS] = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
  const ring = Number(setup(SYS_IO_URING_SETUP, ENTRIES, params));
  if (ring < 0) throw new Error(`io_uring_setup failed (errno ${koffi.errno()}; kernel.io_uring_disabled or a kernel before 6.1)`);
  const features = params[P_FEATURES]!;
  if ((features & IORING_FEAT_SINGLE_MMAP) === 0 || (features & IORING_FEAT_CQE_SKIP) === 0) throw new Error('this kernel lacks IORING_FEAT_SINGLE_MMAP or IORING_FEAT_CQE_SKIP');
  const sqEntries = params[P_SQ_ENTRIES]!;
  const sqOff = params.subarray(P_SQ_OFF, P_SQ_OFF + 10);
  const cqOff = params.subarray(P_CQ_OFF, P_CQ_OFF + 10);
  const ringSize = Math.max(sqOff[SQ_OFF_ARRAY]! + sqEntries * 4, cqOff[CQ_OFF_CQES]! + params[P_CQ_ENTRIES]! * CQE_SIZE);
  const rings = new Uint32Array(map(ringSize, MAP_SHARED | MAP_POPULATE, ring, 0).memory);
  const cqes = new Int32Array(rings.buffer);
  const sqeMemory = map(sqEntries * SQE_SIZE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES).memory;
  const sqe8 = new Uint8Array(sqeMemory);
  const sqe32 = new Int32Array(sqeMemory);
  const sqe64 = new BigUint64Array(sqeMemory);
  const sqTail = sqOff[OFF_TAIL]! >> 2;
  const sqMask = rings[sqOff[OFF_RING_MASK]! >> 2]!;
  const cqHead = cqOff[OFF_HEAD]! >> 2;
  const cqTail = cqOff[OFF_TAIL]! >> 2;
  const cqMask = rings[cqOff[OFF_RING_MASK]! >> 2]!;
  const cqeBase = cqOff[CQ_OFF_CQES]! >> 2;
  // Slot i of the submission queue always names SQE i.
  for (let i = 0; i < sqEntries; i++) rings[(sqOff[SQ_OFF_ARRAY]! >> 2) + i] = i;

  const { memory, address: base } = map(MEMORY_SIZE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  const m32 = new Uint32Array(memory);
  const m64 = new BigUint64Array(memory);
  const at = (offset: number): bigint => base + BigInt(offset);
  for (const [msg, iov] of [[RECV_MSG, RECV_IOV], [SEND_MSG, SEND_IOV]] as const) {
    m64[msg / 8] = at(PEER); // msg_name
    m32[msg / 4 + 2] = SOCKADDR_IN_SIZE; // msg_namelen
    m64[msg / 8 + 2] = at(iov); // msg_iov
    m64[msg / 8 + 3] = 1n; // msg_iovlen
    m64[iov / 8] = at(DATA); // iov_base
    m64[iov / 8 + 1] = BigInt(DATA_SIZE); // iov_len
  }

  let tail = rings[sqTail]!;
  let toSubmit = 0;
  const queue = (opcode: number, flags: number, msg: number, tag: number): void => {
    const sqe = (tail & sqMask) * SQE_SIZE;
    sqe64.fill(0n, sqe / 8, sqe / 8 + SQE_SIZE / 8);
    sqe8[sqe] = opcode;
    sqe8[sqe + 1] = flags;
    sqe32[(sqe + 4) / 4] = fd;
    sqe64[(sqe + 16) / 8] = at(msg); // addr: the struct msghdr
    sqe32[(sqe + 24) / 4] = 1; // len: one msghdr
    sqe64[(sqe + 32) / 8] = BigInt(tag); // user_data
    tail = (tail + 1) >>> 0;
    rings[sqTail] = tail;
    toSubmit++;
  };
  const receive = (): void => {
    m32[RECV_MSG / 4 + 2] = SOCKADDR_IN_SIZE;
    queue(IORING_OP_RECVMSG, 0, RECV_MSG, RECEIVED);
  };

  receive();
  ready();
  for (;;) {
    const r = Number(enter(SYS_IO_URING_ENTER, ring, toSubmit, 1, IORING_ENTER_GETEVENTS, null, 0));
    if (r < 0) {
      const errno = koffi.errno();
      if (errno === EINTR) continue;
      throw new Error(`io_uring_enter failed (errno ${errno})`);
    }
    toSubmit = 0;
    let head = rings[cqHead]!;
    const end = rings[cqTail]!;
    for (; head !== end; head = (head + 1) >>> 0) {
      const cqe = cqeBase + (head & cqMask) * (CQE_SIZE / 4);
      if (cqes[cqe] !== RECEIVED) continue; // a failed send: lost, as UDP may
      const length = cqes[cqe + 2]!;
      if (length > 0) {
        // Linked: the next receive starts once the send is done with DATA (and is cancelled, reported here, if it failed).
        m64[SEND_IOV / 8 + 1] = BigInt(length);
        queue(IORING_OP_SENDMSG, IOSQE_CQE_SKIP_SUCCESS | IOSQE_IO_LINK, SEND_MSG, SENT);
      }
      receive();
    }
    rings[cqHead] = head;
  }
}

/**
 * Every plugin kind and the context a plugin receives.
 *
 * Read this file first. The data flow of a tunnel:
 *
 *   client app -> InboundPlugin (socks5/http) -> Tunnel.openStream -> Mux stream
 *     -> Session (Noise keys, records) -> Link (TransportPlugin) ~~network~~
 *     -> Link -> Session -> Mux stream -> OutboundPlugin.connect -> destination
 *
 * A plugin is a plain object made by `definePlugin({ kind, name, options, create })`
 * (core/define.ts). `create(options, ctx)` returns the kind's instance below.
 * Plugins import from core/ only, never from each other, and touch no globals:
 * everything they need comes in `ctx`.
 */
import type { Duplex } from 'node:stream';
import type { EventBus } from './events.ts';

// ---------------------------------------------------------------------------
// Common

export type Mode = 'client' | 'server';
/** The hash of the Noise handshake (core/noise.ts implements each). */
export type NoiseHash = 'BLAKE2s' | 'SHA256' | 'BLAKE2b' | 'SHA512';
export type LogLevel = 'debug' | 'info' | 'warn' | 'error';

/** One structured log record. `fields` never contains key material. */
export interface LogRecord {
  /** Milliseconds since the epoch. */
  time: number;
  level: LogLevel;
  /** Who logged it: "core", "server", "client", or a plugin's "kind:name". */
  scope: string;
  msg: string;
  fields?: Record<string, unknown>;
}

/** A scoped logger handed to plugins and core parts. Never throws. */
export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string, fields?: Record<string, unknown>): void;
  /** A logger for a sub-scope ("server" -> "server:session"). */
  child(scope: string): Logger;
}

/** What every plugin's `create` receives. */
export interface PluginContext {
  mode: Mode;
  /** Scoped to "kind:name". */
  log: Logger;
  /** The control-plane event bus. Never carries data. */
  events: EventBus;
  /** Aborted when the process shuts down; release everything then. */
  signal: AbortSignal;
  /** The resolved config (read-only; secrets included, so never log it whole). */
  config: ResolvedConfig;
  /** The directory relative paths in the config resolve against (the config file's directory). */
  baseDir: string;
}

/**
 * The schema of one plugin option. The core checks user options against it
 * before `create` runs: an unknown option or a wrong type stops start-up with
 * one line naming the plugin and the option.
 */
export interface OptionSpec {
  type: 'string' | 'number' | 'boolean' | 'string[]' | 'object' | 'any';
  description: string;
  default?: unknown;
  required?: boolean;
  /** Extra check; return an error message (without the option name) or undefined. */
  validate?: (value: unknown) => string | undefined;
}
export type OptionsSchema = Record<string, OptionSpec>;

export type PluginKind = 'transport' | 'cipher' | 'auth' | 'logger' | 'inbound' | 'outbound';

export interface PluginInstanceMap {
  transport: TransportPlugin;
  cipher: CipherPlugin;
  auth: AuthPlugin;
  logger: LoggerPlugin;
  inbound: InboundPlugin;
  outbound: OutboundPlugin;
}

/** The default export of a plugin file. */
export interface PluginDefinition<K extends PluginKind = PluginKind, O = Record<string, unknown>> {
  kind: K;
  name: string;
  /** One line for `check` and the README. */
  description?: string;
  /** Which modes may load it; default both. */
  modes?: Mode[];
  options?: OptionsSchema;
  /** Builds the instance. May be async. Errors are wrapped with the plugin's name by the core. */
  create(options: O, ctx: PluginContext): PluginInstanceMap[K] | Promise<PluginInstanceMap[K]>;
}

/** Every instance may release resources on shutdown. Must be idempotent. */
export interface Closable {
  close?(): void | Promise<void>;
}

// ---------------------------------------------------------------------------
// transport

/**
 * Handlers a Link delivers to. Set once with `link.start(handlers)`; the Link
 * delivers nothing before that (it may buffer a bounded amount or pause reading).
 */
export interface LinkHandlers {
  /**
   * One whole record as the peer sent it. The buffer is the receiver's: it
   * may keep it and write into it (the session decrypts in place). The link
   * never touches it again.
   */
  record(record: Buffer): void;
  /** After `send` returned false: the link can take more. */
  drain(): void;
  /** The link is gone (peer closed, error, or close()). Called exactly once. */
  close(err?: Error): void;
}

/**
 * One connection between a client and the server that carries opaque records.
 * Stream transports (tcp, ws) frame records themselves (tcp: 2-byte big-endian
 * length prefix; ws: one binary message per record); datagram transports
 * send one record per datagram.
 */
export interface Link {
  /** 'stream': reliable and ordered. 'datagram': records may be lost, duplicated or reordered. */
  readonly type: 'stream' | 'datagram';
  /** The peer's address as "host:port" (IPv6 in brackets), for logs. */
  readonly remoteAddress: string;
  /** The largest record `send` accepts, in bytes (tcp/ws: 65535). */
  readonly maxRecordSize: number;
  /** Begin delivering to `handlers`. Called once. */
  start(handlers: LinkHandlers): void;
  /**
   * Queue one record. Never throws for a closed link (drops silently).
   * Returns false when the caller should stop sending until `drain`.
   * The link may keep a reference to `record` while it is queued; when
   * `bufferedAmount` is 0 right after the call, it holds none and the caller
   * may reuse the memory (the session does: see Session.payloadBuffer).
   */
  send(record: Buffer): boolean;
  /**
   * Bytes of framing the link puts before each record (tcp: 2), for
   * sendInPlace. Absent together with sendInPlace.
   */
  readonly headroom?: number;
  /**
   * Like send, but without a copy: the `headroom` bytes just before `record`
   * in its memory are the link's to overwrite with its framing, and the
   * caller gives up the record and that room (the link may write the whole
   * region as it is, later) — except that, as with send, when
   * `bufferedAmount` is 0 right after the call the link holds no reference
   * and the caller may reuse the memory.
   */
  sendInPlace?(record: Buffer): boolean;
  /** Queue several records in one write (writev / cork). Same return meaning as send. */
  sendBatch(records: Buffer[]): boolean;
  /** Bytes queued but not yet handed to the OS. 0 means the link holds no record's memory. */
  readonly bufferedAmount: number;
  /** Flush what is queued, then close. */
  close(): void;
  /** Close at once, dropping what is queued. */
  destroy(): void;
}

export interface TransportListener {
  /** The bound address, "host:port". */
  readonly address: string;
  /** Stop accepting new links. Existing links stay open. */
  close(): Promise<void>;
}

/**
 * A transport is one of two kinds. A stream transport (tcp, ws) makes one
 * Link per client and frames records itself. A datagram transport (udp) is a
 * dumb socket: it binds a DatagramEndpoint and moves datagrams; the session
 * layer (core/session-datagram.ts) does everything else, as WireGuard's
 * device does over its conn.Bind (indices, replay window, roaming,
 * handshake retransmission). Narrow on `type`.
 */
export type TransportPlugin = StreamTransportPlugin | DatagramTransportPlugin;

export interface StreamTransportPlugin extends Closable {
  readonly name: string;
  readonly type: 'stream';
  /**
   * Listen on `address` ("host:port" or, for ws, "host:port" with the path from
   * the plugin's options). Calls `onLink` for every new peer. Rejects with a
   * DshieldError(LISTEN) when the address cannot be bound.
   */
  listen(address: string, onLink: (link: Link) => void): Promise<TransportListener>;
  /**
   * Connect to the server ("host:port", or a ws:// / wss:// URL for ws).
   * Rejects with DshieldError(UNREACHABLE) when the server cannot be reached.
   */
  dial(address: string, signal?: AbortSignal): Promise<Link>;
}

/** What a DatagramEndpoint delivers to. Set once with `endpoint.start(handlers)`. */
export interface DatagramHandlers {
  /**
   * One datagram as it arrived, from `from` (numeric "ip:port", IPv6 in
   * brackets, exactly as `send` takes it back). The buffer is the
   * receiver's: it may keep it and write into it (sessions decrypt in
   * place). Anyone on the network can send anything: the endpoint filters nothing.
   */
  datagram(data: Buffer, from: string): void;
  /** After `send` returned false: the endpoint can take more. */
  drain(): void;
  /** The endpoint is gone (close(), or a socket error). Called exactly once. */
  close(err?: Error): void;
}

/**
 * One bound datagram socket, shared by every session on it (server) or
 * owned by one session (client). It knows nothing of sessions or peers.
 */
export interface DatagramEndpoint {
  /** The bound address, numeric "ip:port" (IPv6 in brackets). */
  readonly localAddress: string;
  /**
   * The largest datagram `send` accepts, in bytes. Chosen by the transport
   * so that datagrams fit the path (see its `mtu` option).
   */
  readonly maxDatagramSize: number;
  /**
   * Begin delivering to `handlers`. Called once. Datagrams that arrive
   * before are kept up to a small bound, then dropped (UDP may drop).
   */
  start(handlers: DatagramHandlers): void;
  /**
   * Send one datagram to `to` (numeric "ip:port" / "[ipv6]:port"; no name
   * lookups on the data path). Never throws for network conditions; a lost
   * datagram is not reported. Returns false when the caller should stop
   * until `drain` (too many sends in flight; the endpoint drops datagrams
   * beyond its bound) or when the endpoint is closed. Throws RangeError for a
   * datagram above maxDatagramSize or a malformed `to` (caller bugs). The
   * endpoint may hold `datagram` until the OS has taken it: do not modify
   * it after the call, unless `pending` is 0 right after it.
   */
  send(datagram: Buffer, to: string): boolean;
  /**
   * Datagrams the endpoint holds that the OS has not taken yet. When it is 0
   * right after `send`, the endpoint keeps no reference to that datagram and
   * the caller may reuse its memory (sessions do). Absent: assume it keeps
   * every datagram.
   */
  readonly pending?: number;
  /** Stop delivering, let sends in flight finish, release the socket. Idempotent. */
  close(): void;
  /**
   * Optional: stop reading datagrams on the event loop, so that a thread of
   * the caller's reads the socket instead (recvfrom(2) on a dup of `fd`) and
   * passes on what it does not handle. `resume()` reads on the event loop
   * again. Undefined where the socket cannot be read that way (an IPv6
   * socket, no koffi); the endpoint then goes on as before.
   */
  handOffReceive?(): { fd: number; resume(): void } | undefined;
}

export interface DatagramTransportPlugin extends Closable {
  readonly name: string;
  readonly type: 'datagram';
  /**
   * Bind a datagram socket on `address` ("host:port"; port 0 for any).
   * The server binds its listen address; a client binds "0.0.0.0:0" or
   * "[::]:0" by the server's address family. Rejects with DshieldError(LISTEN)
   * when the address cannot be bound, CONFIG when it is malformed.
   */
  bind(address: string): Promise<DatagramEndpoint>;
}

// ---------------------------------------------------------------------------
// cipher

/**
 * An AEAD as Noise uses it: 32-byte key, 64-bit counter nonce, 16-byte tag.
 * `encrypt` and `decrypt` are synchronous (the data path never awaits per record).
 * The nonce encoding follows the Noise spec for `noiseName`
 * (ChaChaPoly: 4 zero bytes + counter little-endian; AESGCM: 4 zero bytes + counter big-endian).
 */
export interface CipherPlugin {
  readonly name: string;
  /** The cipher's name in a Noise protocol name: 'ChaChaPoly' or 'AESGCM'. */
  readonly noiseName: string;
  /**
   * Returns ciphertext || 16-byte tag. `counter` is an integer in [0, 2^53).
   * `out`, when given, is where the caller would like the result: exactly
   * plaintext.length + 16 bytes, possibly starting at plaintext's first byte
   * (sealing in place). A cipher may write there and return `out`, or return a
   * fresh buffer: callers use what is returned.
   */
  encrypt(key: Buffer, counter: number, ad: Uint8Array, plaintext: Uint8Array, out?: Buffer): Buffer;
  /**
   * Returns the plaintext, or null when authentication fails. Never throws for
   * bad input. `out` works as in encrypt (exactly ciphertext.length - 16
   * bytes, possibly starting at ciphertext's first byte); after a failure its
   * bytes are undefined (the ciphertext may be gone when in place).
   */
  decrypt(key: Buffer, counter: number, ad: Uint8Array, ciphertext: Uint8Array, out?: Buffer): Buffer | null;
  /**
   * Optional: how another thread computes this same AEAD. The `export` of
   * `module` (a file URL) is a function that returns an InPlaceAead
   * (core/aead.ts), or null where it cannot load in that thread. TUN mode
   * over udp opens packets on a thread of its own with it (core/datapath/);
   * without it, every record is opened on the main thread.
   */
  readonly thread?: { module: string; export: string };
}

// ---------------------------------------------------------------------------
// auth

/** Who a client is, once the server has authorized its static key. */
export interface ClientIdentity {
  /** The name from server.clients, used in logs. */
  name: string;
  /** Base64 of the client's static public key. */
  publicKey: string;
}

export interface AuthPlugin extends Closable {
  readonly name: string;
  /**
   * Server side: decide whether the holder of `clientPublicKey` (32 bytes,
   * proven by the handshake) may connect. Returns the identity, or null to
   * refuse (the server then answers nothing). Synchronous: it runs once per
   * handshake and must be cheap.
   */
  authorize(clientPublicKey: Buffer): ClientIdentity | null;
  /**
   * The 32-byte pre-shared key for IKpsk2, or undefined for plain IK. On the
   * server it is asked after `authorize`, with the client's key; on the client
   * with no argument. Both sides must agree or the handshake fails (silently).
   */
  psk(clientPublicKey?: Buffer): Buffer | undefined;
  /**
   * Server side, optional: replace the list that came from server.clients.
   * The server calls it when server.clientsFile changes, so a client added
   * by `dshield invite` may connect without a restart. Throws
   * DshieldError(KEY) for a malformed entry, keeping the old list.
   */
  setClients?(clients: ClientEntry[]): void;
}

// ---------------------------------------------------------------------------
// logger

export interface LoggerPlugin extends Closable {
  readonly name: string;
  /** The lowest level this sink writes; the core skips building records no sink wants. */
  readonly minLevel?: LogLevel;
  /** Receives every record at or above the plugin's level. Must not throw or block. */
  log(record: LogRecord): void;
}

// ---------------------------------------------------------------------------
// outbound (server)

export interface Target {
  /** A domain name, an IPv4 address or an IPv6 address (no brackets). */
  host: string;
  port: number;
}

/** A UDP relay on the server for one SOCKS5 UDP ASSOCIATE. */
export interface UdpRelay {
  /** Send one datagram to target (egress policy applies; denied datagrams are dropped). */
  send(target: Target, payload: Buffer): void;
  /** Datagrams coming back from any target. */
  onMessage(handler: (from: Target, payload: Buffer) => void): void;
  close(): void;
}

export interface OutboundPlugin extends Closable {
  readonly name: string;
  /**
   * Open a TCP connection to target. Resolves DNS on the server and checks
   * the egress policy on the resolved address at connect time. Rejects with
   * DshieldError(EGRESS_DENIED) or DshieldError(DESTINATION) (detail.reason:
   * 'refused' | 'unreachable' | 'dns' | 'timeout').
   */
  connect(target: Target, signal?: AbortSignal): Promise<Duplex>;
  /** Create a UDP relay for one client association. */
  udp(): UdpRelay;
}

// ---------------------------------------------------------------------------
// inbound (client)

/** A UDP association through the tunnel (for SOCKS5 UDP ASSOCIATE). */
export interface TunnelUdp {
  send(target: Target, payload: Buffer): void;
  onMessage(handler: (from: Target, payload: Buffer) => void): void;
  close(): void;
}

export interface OpenStreamOptions {
  /** Resolve before the server has reached the destination (see Tunnel.openStream). */
  early?: boolean;
}

/** What the client core offers its inbound plugins. */
export interface Tunnel {
  /**
   * Open a stream to target through the tunnel. While the tunnel reconnects
   * it waits (up to client.connectWait) instead of failing. Rejects with a
   * DshieldError whose code says why (EGRESS_DENIED, DESTINATION with
   * detail.reason, TUNNEL_DOWN).
   *
   * With `early`, resolves once the open is on its way, without waiting for
   * the server to reach the destination: what is written at once travels
   * right behind the open (one round trip to the server less per
   * connection). A refusal then arrives as the stream's 'error', with the
   * same DshieldError, and what was written is lost.
   */
  openStream(target: Target, options?: OpenStreamOptions): Promise<Duplex>;
  /** Open a UDP association through the tunnel. */
  openUdp(): TunnelUdp;
  /**
   * IP packets through the tunnel (TUN mode). Present only when client.tun is
   * on; the first session has then already been answered with TUN parameters.
   */
  readonly packets?: TunnelPackets;
}

/** What the server assigns a TUN-mode client in the handshake response (`tun`). */
export interface TunParams {
  /** The client's IPv4 address with the pool's prefix, e.g. "10.66.0.2/24". */
  address: string;
  /** The client's IPv6 address with prefix, when the server has an IPv6 pool. */
  address6?: string;
  /** Resolvers to use through the tunnel. */
  dns: string[];
  /** The TUN device's MTU; packets are never larger. */
  mtu: number;
}

/** The client core's packet path for inbound-tun. */
/**
 * The reading of a TUN queue lent to another thread (TunDevice.lendReader):
 * while the pump's CTRL_READER slot (core/tun/pump-protocol.ts) says
 * READER_MAIN, the borrower reads the fd, where the main thread's event
 * loop would; when packets come in bursts it sets READER_PUMP and writes
 * `pumpWakeFd`, as the main thread would. The pump hands reading back as
 * usual; the lender then calls the borrower's wake().
 */
export interface TunReaderLoan {
  /** The queue's fd (O_NONBLOCK). The borrower reads through a dup of it. */
  readonly fd: number;
  /** The pump's control slots (Int32). */
  readonly ctrl: SharedArrayBuffer;
  /** The pump's eventfd. */
  readonly pumpWakeFd: number;
  /** The borrower has stopped reading: the main thread reads again. Idempotent. */
  giveBack(): void;
}

/** What the borrower of a TUN queue's reading is told (TunDevice.lendReader). */
export interface TunReaderHooks {
  /** The pump handed reading back: look at CTRL_READER again. */
  wake(): void;
  /** The device is closing: stop using the fd (and its dup) now. */
  revoke(): void;
}

/** What a TUN offers a packet thread that writes (and reads) its packets itself (Session.offloadPackets). */
export interface TunOffload {
  /** A TUN fd; the caller keeps owning it (the thread writes to a dup). */
  fd: number;
  /** A packet the thread read from the TUN but cannot send: handle it as if the device had read it. */
  readBack?(packet: Buffer): void;
  /** Lend the reading of lone packets to the thread (see TunReaderLoan); undefined: the device cannot. */
  lendReader?(hooks: TunReaderHooks): TunReaderLoan | undefined;
}

export interface TunnelPackets {
  /**
   * The server endpoint, resolved once at start: the client dials this
   * address on every reconnect (no DNS while the tunnel owns the resolver),
   * so it must stay routed outside the tunnel and allowed by a kill switch.
   */
  readonly server: { ip: string; port: number; protocol: 'tcp' | 'udp' };
  /** The parameters of the latest session (the current one while up). */
  readonly params: TunParams;
  /** True while a session is up. */
  readonly up: boolean;
  /**
   * Send one IP packet (copied before return). False when it was dropped:
   * tunnel down, congested, or larger than params.mtu. Never queues unboundedly.
   * `alone`: no more packets follow in this turn of the event loop (the TUN
   * device read this one by itself), so it may go out at once instead of
   * waiting to share a record with others (see Mux.sendPacket).
   */
  send(packet: Uint8Array, alone?: boolean): boolean;
  /** Packets from the server; the buffer is valid only during the call. One handler; a later call replaces it. */
  onPacket(handler: (packet: Buffer) => void): void;
  /**
   * Optional: packets from the server may also be written straight into
   * `tun.fd` by a packet thread, never reaching onPacket (see
   * Session.offloadPackets); the core asks every session it brings up. The
   * thread may also read lone packets from the TUN and send them itself.
   * Undo with the returned function. The caller keeps owning `fd`.
   */
  offloadTo?(tun: TunOffload): () => void;
  /** Called on every session up after the first (a reconnect), with that session's parameters. */
  onUp(handler: (params: TunParams) => void): void;
  /** Called when a session goes down (packets are dropped until onUp). */
  onDown(handler: (reason: string) => void): void;
}

export interface InboundPlugin extends Closable {
  readonly name: string;
  /** Start capturing; resolves with what to tell the user (e.g. "socks5://127.0.0.1:1080"). */
  start(tunnel: Tunnel): Promise<{ address: string }>;
}

// ---------------------------------------------------------------------------
// config

/** How a plugin is named in the config: a short name, a path, or { use, ...options }. */
export type PluginRef = string | ({ use: string } & Record<string, unknown>);

export interface ClientEntry {
  name: string;
  /** Base64 of 32 bytes. */
  publicKey: string;
}

export interface ProxyListenConfig {
  listen: string;
  [option: string]: unknown;
}

export interface UserConfig {
  transport?: PluginRef;
  cipher?: PluginRef;
  auth?: PluginRef;
  logging?: PluginRef[];
  /** The Noise hash: 'BLAKE2s' (default), 'SHA256', 'BLAKE2b' or 'SHA512'. */
  hash?: NoiseHash;
  server?: {
    listen?: string;
    privateKey?: string;
    clients?: ClientEntry[];
    egress?: { allow?: string[] };
    /** Milliseconds a connection that fails to authenticate is read and discarded before it is closed. */
    handshakeTimeout?: number;
    /**
     * Over a datagram transport (udp): handshake initiations examined per
     * second, all sources together (default 1000). Each costs an X25519
     * before the server knows who sent it, so this bounds what a flood of
     * forged initiations can take; authentic ones beyond it are answered
     * when the client resends.
     */
    handshakesPerSecond?: number;
    /** Over a datagram transport (udp): initiations examined per second from one IP address (default 20, in bursts of up to twice that). */
    handshakesPerSource?: number;
    /** Where `invite` writes new clients: a JSON file of ClientEntry[] merged into clients. */
    clientsFile?: string;
    /** The address clients should dial, written into invites ("host:port" or a ws URL). */
    publicAddress?: string;
    /** Outbound plugin: default 'direct'. */
    outbound?: PluginRef;
    /** Full-device VPN: give clients addresses and forward their packets (Linux, root). */
    tun?: boolean | ServerTunUserConfig;
  };
  client?: {
    server?: string;
    serverPublicKey?: string;
    privateKey?: string;
    socks?: string | false | ProxyListenConfig;
    http?: string | false | ProxyListenConfig;
    /** Milliseconds a new stream waits for the tunnel during a reconnect. */
    connectWait?: number;
    /** Milliseconds between keepalive pings when idle. */
    keepalive?: number;
    /** Milliseconds to wait for the server's handshake response. */
    handshakeTimeout?: number;
    /** Full-device VPN: capture every packet with a TUN device (Linux, root). */
    tun?: boolean | ClientTunUserConfig;
  };
}

export interface ClientTunUserConfig {
  /** Device name, or a pattern with %d (default "dshield%d"). */
  name?: string;
  /** Ranges to send through the tunnel; default everything (and IPv6 when the server assigns an address). */
  routes?: string[];
  /** Ranges that keep using the real network. */
  exclude?: string[];
  /** Use the resolvers the server names (restored on exit). Default true. */
  dns?: boolean;
  /** Block (nftables) every packet not for the tunnel or the server, also while reconnecting. Default false. */
  killSwitch?: boolean;
  /** TUN queues (default 1). */
  queues?: number;
  /** Where the crash-recovery journal lives (default /var/lib/dshield). */
  stateDir?: string;
  /** The resolver file dns: true replaces and restores (default /etc/resolv.conf). */
  resolvConf?: string;
}

export interface ServerTunUserConfig {
  /** The client address pool (default "10.66.0.0/24"); the server takes the first address. */
  subnet?: string;
  /** An IPv6 pool (default none: IPv6 from clients is dropped). */
  subnet6?: string;
  /** Masquerade clients behind the server's address (default true). */
  nat?: boolean;
  /** Resolvers clients use (default ["1.1.1.1"]). */
  dns?: string[] | string;
  /** Let clients reach each other (default false). */
  clientToClient?: boolean;
  /** Device name, or a pattern with %d (default "dshield%d"). */
  name?: string;
  /** Where each client's address is remembered (default keys/leases.json). */
  leasesFile?: string;
  /** The TUN MTU handed to clients (default 1420). */
  mtu?: number;
  /** Where the crash-recovery journal lives (default /var/lib/dshield). */
  stateDir?: string;
}

/** client.tun once resolved: every field present. */
export interface ClientTunConfig {
  name: string;
  /** null: everything (0.0.0.0/1 + 128.0.0.0/1, and ::/1 + 8000::/1 when the server assigns IPv6). */
  routes: string[] | null;
  exclude: string[];
  dns: boolean;
  killSwitch: boolean;
  queues: number;
  stateDir: string;
  resolvConf: string;
}

/** server.tun once resolved: every field present; leasesFile is absolute. */
export interface ServerTunConfig {
  subnet: string;
  /** '' when there is no IPv6 pool. */
  subnet6: string;
  nat: boolean;
  dns: string[];
  clientToClient: boolean;
  name: string;
  leasesFile: string;
  mtu: number;
  stateDir: string;
}

/**
 * The config after defaults, file, environment and --set; every field present.
 * Key fields (server.privateKey, server.clients[].publicKey, client.privateKey,
 * client.serverPublicKey) hold base64 of 32 bytes once loaded with keys
 * materialized (core/config.ts): paths in the user's config are read (and a
 * missing private key file is created, mode 0600) before plugins see them.
 * server.clients includes the entries from server.clientsFile (written by `invite`).
 */
export interface ResolvedConfig {
  /** Where the config came from (a path), or null for built-in defaults. */
  source: string | null;
  baseDir: string;
  transport: ResolvedPluginRef;
  cipher: ResolvedPluginRef;
  auth: ResolvedPluginRef;
  logging: ResolvedPluginRef[];
  hash: NoiseHash;
  server: {
    listen: string;
    privateKey: string;
    clients: ClientEntry[];
    egress: { allow: string[] };
    handshakeTimeout: number;
    handshakesPerSecond: number;
    handshakesPerSource: number;
    clientsFile: string;
    publicAddress: string;
    outbound: ResolvedPluginRef;
    tun: ServerTunConfig | false;
  };
  client: {
    server: string;
    serverPublicKey: string;
    privateKey: string;
    socks: ProxyListenConfig | false;
    http: ProxyListenConfig | false;
    connectWait: number;
    keepalive: number;
    handshakeTimeout: number;
    tun: ClientTunConfig | false;
  };
}

export interface ResolvedPluginRef {
  /** The name or path as the user wrote it. */
  use: string;
  options: Record<string, unknown>;
}

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
   * One whole record as the peer sent it. The buffer may be reused by the
   * link after the handler returns: copy what must outlive the call.
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
   * The link must not keep a reference to `record` past the call unless it
   * owns it: callers may pass a fresh buffer and not reuse it.
   */
  send(record: Buffer): boolean;
  /** Queue several records in one write (writev / cork). Same return meaning as send. */
  sendBatch(records: Buffer[]): boolean;
  /** Bytes queued but not yet handed to the OS. */
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

export interface TransportPlugin extends Closable {
  readonly name: string;
  readonly type: 'stream' | 'datagram';
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
  /** Returns ciphertext || 16-byte tag. `counter` is an integer in [0, 2^53). */
  encrypt(key: Buffer, counter: number, ad: Uint8Array, plaintext: Uint8Array): Buffer;
  /** Returns the plaintext, or null when authentication fails. Never throws for bad input. */
  decrypt(key: Buffer, counter: number, ad: Uint8Array, ciphertext: Uint8Array): Buffer | null;
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

/** What the client core offers its inbound plugins. */
export interface Tunnel {
  /**
   * Open a stream to target through the tunnel. While the tunnel reconnects
   * it waits (up to client.connectWait) instead of failing. Rejects with a
   * DshieldError whose code says why (EGRESS_DENIED, DESTINATION with
   * detail.reason, TUNNEL_DOWN).
   */
  openStream(target: Target): Promise<Duplex>;
  /** Open a UDP association through the tunnel. */
  openUdp(): TunnelUdp;
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
    /** Where `invite` writes new clients: a JSON file of ClientEntry[] merged into clients. */
    clientsFile?: string;
    /** The address clients should dial, written into invites ("host:port" or a ws URL). */
    publicAddress?: string;
    /** Outbound plugin: default 'direct'. */
    outbound?: PluginRef;
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
  };
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
    clientsFile: string;
    publicAddress: string;
    outbound: ResolvedPluginRef;
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
  };
}

export interface ResolvedPluginRef {
  /** The name or path as the user wrote it. */
  use: string;
  options: Record<string, unknown>;
}

/**
 * dshield's config. As shipped it runs a server and a client on this one
 * machine with no edits:
 *
 *   npx tsx bin/dshield.ts --mode server     # first: creates keys/server.key, keys/client.key
 *   npx tsx bin/dshield.ts --mode client     # then: SOCKS5 on 127.0.0.1:1080, HTTP on 127.0.0.1:8080
 *
 * Every key can be overridden without editing this file:
 *   environment  DSHIELD_<KEY> with "__" between levels, any case, JSON values allowed:
 *                DSHIELD_CLIENT__SERVER=10.0.0.5:8443  DSHIELD_TRANSPORT=ws
 *                DSHIELD_SERVER__EGRESS__ALLOW='["192.168.1.0/24"]'  DSHIELD_TRANSPORT__PATH=/tunnel
 *   command line --set client.server=10.0.0.5:8443   (repeatable)
 * Precedence: built-in defaults < this file < environment < --invite < --set.
 *
 * A plugin is named by its short name ('ws'), by a path to your own plugin
 * file ('./my-transport.ts'), or with options as { use: 'ws', path: '/tunnel' }.
 * `dshield check` prints the resolved config (secrets redacted) and the built-in plugins.
 *
 * Key fields hold a key (base64 of 32 bytes, as `wg genkey` prints) or the
 * path of a file holding one, relative to this file. A missing private key
 * file is created (mode 0600) on first start. Key files are never logged.
 */
import { defineConfig } from './core/define.ts';

export default defineConfig({
  // How records travel: 'tcp' (default) or 'ws' (WebSocket: passes HTTP proxies and CDNs; options
  // { use: 'ws', path: '/dshield', connectTimeout: 10_000 }). `dshield check` lists every built-in.
  transport: 'tcp',

  // The AEAD for the handshake and every record: 'chacha20-poly1305' (default) or 'aes-256-gcm'
  // (faster where the CPU has AES instructions). Client and server must agree.
  cipher: 'chacha20-poly1305',

  // The hash of the Noise handshake: 'BLAKE2s' (default), 'SHA256', 'BLAKE2b' or 'SHA512'. Client and server must agree.
  hash: 'BLAKE2s',

  // Who may connect: 'keys' (each client's public key is listed in server.clients) or
  // { use: 'psk', psk: 'keys/psk' } to also require a pre-shared key (Noise IKpsk2).
  auth: 'keys',

  // Where log records go. console: lines on stderr at `level` (debug, info, warn, error).
  // file: JSON lines in `dir` (relative to this file) at `level`, rotated at maxBytes, keeping maxFiles.
  // Turn on debug without editing: --set logging.console.level=debug (or DSHIELD_LOGGING__CONSOLE__LEVEL=debug).
  logging: [
    { use: 'console', level: 'info' },
    { use: 'file', dir: 'logs' },
  ],

  server: {
    // Where the server accepts tunnels. 127.0.0.1 keeps the shipped config safe: nothing off this
    // machine can reach it. Use '0.0.0.0:8443' (or '[::]:8443') to serve other machines.
    listen: '127.0.0.1:8443',

    // The server's static private key (created on first start); its public key goes next to it in
    // keys/server.pub, which clients pin.
    privateKey: 'keys/server.key',

    // The clients allowed in: a name (for logs) and the client's public key or its .pub file.
    // 'local' is the client on this machine; its key pair is created on first start.
    clients: [{ name: 'local', publicKey: 'keys/client.pub' }],

    // `dshield invite NAME` adds clients here (a JSON list merged into `clients`).
    clientsFile: 'keys/clients.json',

    // The address clients dial, written into invites. Empty: taken from `listen` when that is a
    // concrete address.
    publicAddress: '',

    // Destinations the server refuses by default (loopback, private, link-local, CGNAT, multicast,
    // cloud metadata) can be allowed here by range, e.g. ['192.168.1.0/24'].
    egress: { allow: [] },

    // Milliseconds a connection that does not authenticate is read (and ignored) before it is closed.
    handshakeTimeout: 15_000,

    // Over udp: handshake initiations the server examines per second, from everyone together and
    // from one IP address (in bursts of up to twice that). Each costs an X25519 before the server
    // knows who sent it; a client turned away resends. Raise them for many clients behind one NAT,
    // or for a reconnect storm of thousands of clients (a core does about 2,000 a second).
    handshakesPerSecond: 1000,
    handshakesPerSource: 20,

    // How the server reaches destinations: 'direct' (its own network).
    outbound: 'direct',

    // Full-device VPN for clients with client.tun (Linux, root or CAP_NET_ADMIN, /dev/net/tun, nftables).
    // true, or { subnet: '10.66.0.0/24' (the pool; the server takes .1), subnet6: 'fd66::/64' (optional),
    // nat: true (masquerade clients behind this host), dns: ['1.1.1.1'] (resolvers handed to clients),
    // clientToClient: false, name: 'dshield%d', leasesFile: 'keys/leases.json' (each client keeps its
    // address across restarts), mtu: 1420, stateDir: '/var/lib/dshield' (crash-recovery journal) }.
    // Forwarded packets obey egress.allow and the default deny list, like proxy connections.
    // Proxy clients keep working either way.
    tun: false,
  },

  client: {
    // The server: "host:port", or a ws:// / wss:// URL with the ws transport.
    server: '127.0.0.1:8443',

    // The server's public key (pinned: a different key stops the client) or the file holding it.
    serverPublicKey: 'keys/server.pub',

    // The client's static private key (created on first start; its public key is keys/client.pub).
    privateKey: 'keys/client.key',

    // The local proxies apps use: "host:port", { listen: "host:port", ...options }, or false for none.
    // They listen on 127.0.0.1 so only this machine can use them.
    socks: '127.0.0.1:1080',
    http: '127.0.0.1:8080',

    // Milliseconds a new connection waits for the tunnel while it reconnects.
    connectWait: 10_000,

    // Milliseconds between keepalive pings on an idle tunnel.
    keepalive: 25_000,

    // Milliseconds to wait for the server's handshake response.
    handshakeTimeout: 10_000,

    // Full-device VPN (Linux, root; the server needs server.tun): every app's traffic goes through the tunnel.
    // true, or { routes: [...] (only these ranges; default everything, IPv6 too when the server assigns it),
    // exclude: ['192.168.1.0/24'] (ranges that keep using the real network), dns: true (use the server's
    // resolvers; /etc/resolv.conf is restored on exit), killSwitch: false (true: nftables drops everything
    // but the tunnel and the server, also while reconnecting), name: 'dshield%d', queues: 1,
    // stateDir: '/var/lib/dshield' (what a crashed run changed is undone by the next start) }.
    // The proxies above can stay on alongside. Try it: --set client.tun=true
    tun: false,
  },
});

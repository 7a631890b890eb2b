/**
 * The null Node TUN relay (drivers/tun-relay.ts) as a system the diagnostic
 * scripts run beside dshield and OpenVPN (relay-floor.ts, syscall-gaps.ts).
 */
import { fileURLToPath } from 'node:url';
import type { SystemSpec } from './peers.ts';
import { startIn, type BenchProc } from './proc.ts';
import { PORTS } from './settings.ts';
import { nsRun } from './topology.ts';

const TSX = import.meta.resolve('tsx');
const RELAY = fileURLToPath(new URL('./drivers/tun-relay.ts', import.meta.url));
const RELAY_SUBNET = '10.12.0.0/24';

/**
 * Two relays (tun-relay.ts), client to server, routing the web host through them as
 * the VPNs do. `aead`: 'none' or a cipher's name; `options`: the driver's
 * ('thread', 'vnet').
 */
export function relay(aead: 'none' | string, options: string[]): SystemSpec {
  return {
    id: `relay/${aead}/${options.join('+') || 'main'}`,
    system: 'null TUN relay',
    mode: 'tun',
    cipher: aead,
    role: 'reference',
    expectSource: 'server',
    needs: [],
    async start(bt) {
      const { ns, addr } = bt.topo;
      const at = `${addr.serverClientSide}:${PORTS.relay}`;
      const procs: BenchProc[] = [];
      const start = async (where: string, role: string, dev: string): Promise<void> => {
        const proc = startIn(where, `relay(${role})`, process.execPath, ['--import', TSX, RELAY, role, dev, at, aead, ...options]);
        procs.push(proc);
        await proc.waitFor(/^READY$/m, 20_000);
      };
      try {
        await start(ns.server, 'server', 'nrelay0');
        await start(ns.client, 'client', 'nrelay0');
        await nsRun(ns.server, 'ip', ['-batch', '-'], 'addr add 10.12.0.1/24 dev nrelay0\nlink set nrelay0 mtu 1400 up\n');
        await nsRun(ns.client, 'ip', ['-batch', '-'], `addr add 10.12.0.2/24 dev nrelay0\nlink set nrelay0 mtu 1400 up\nroute add ${bt.webIp}/32 dev nrelay0\n`);
        await bt.forwarding(true);
        await bt.masquerade(RELAY_SUBNET);
      } catch (err) {
        await Promise.allSettled(procs.map((p) => p.stop()));
        throw err;
      }
      return {
        pids: procs.map((p) => p.pid),
        notes: [],
        async stop() {
          await Promise.allSettled(procs.map((p) => p.stop()));
          await bt.unmasquerade();
          await bt.forwarding(false);
        },
      };
    },
  };
}

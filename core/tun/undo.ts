/**
 * How to take back each change TUN mode makes to the system, as plain data,
 * so the process that made a change can undo it, and so can a later process
 * after a crash (state.ts keeps these records in a file).
 *
 * Every undo is idempotent: undoing something that is already gone (or was
 * never applied, when a crash came between recording and applying) is not an
 * error.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { isMissing, runCommand } from './command.ts';
import { restoreResolv, type ResolvRecord } from './resolv.ts';

export type UndoRecord =
  /** `ip [-6] route del <spec>` */
  | { kind: 'route'; family: 4 | 6; spec: string[] }
  /** `ip addr del <cidr> dev <dev>` */
  | { kind: 'addr'; dev: string; cidr: string }
  /** `ip link set <dev> mtu <mtu>` (a device we do not own, whose MTU we changed) */
  | { kind: 'mtu'; dev: string; mtu: number }
  /** `nft delete table <family> <name>` */
  | { kind: 'nft-table'; family: 'inet' | 'ip' | 'ip6'; name: string }
  /** Put resolv.conf back (resolv.ts) */
  | { kind: 'resolv'; rec: ResolvRecord }
  /** Write `previous` back to a /proc/sys file. */
  | { kind: 'sysctl'; path: string; previous: string }
  /** Delete a TUN device if it still exists (only a persistent one can outlive its process). */
  | { kind: 'tun-device'; name: string };

/** One line for logs. */
export function describeUndo(rec: UndoRecord): string {
  switch (rec.kind) {
    case 'route':
      return `route ${rec.spec.join(' ')}`;
    case 'addr':
      return `address ${rec.cidr} on ${rec.dev}`;
    case 'mtu':
      return `MTU ${rec.mtu} on ${rec.dev}`;
    case 'nft-table':
      return `nftables table ${rec.family} ${rec.name}`;
    case 'resolv':
      return `DNS settings in ${rec.rec.path}`;
    case 'sysctl':
      return `${rec.path} = ${rec.previous.trim()}`;
    case 'tun-device':
      return `TUN device ${rec.name}`;
  }
}

/** Undo one change. Returns a note when it was left alone on purpose (e.g. resolv.conf changed by someone else). */
export async function undo(rec: UndoRecord): Promise<string | undefined> {
  const quiet = async (cmd: string, args: string[]) => {
    try {
      await runCommand(cmd, args);
    } catch (err) {
      if (!isMissing(err)) throw err;
    }
  };
  switch (rec.kind) {
    case 'route':
      await quiet('ip', [rec.family === 6 ? '-6' : '-4', 'route', 'del', ...rec.spec]);
      return undefined;
    case 'addr':
      await quiet('ip', ['addr', 'del', rec.cidr, 'dev', rec.dev]);
      return undefined;
    case 'mtu':
      await quiet('ip', ['link', 'set', 'dev', rec.dev, 'mtu', String(rec.mtu)]);
      return undefined;
    case 'nft-table':
      await quiet('nft', ['delete', 'table', rec.family, rec.name]);
      return undefined;
    case 'resolv': {
      const r = restoreResolv(rec.rec);
      return r === 'changed' ? `${rec.rec.path} was changed by something else since; left as it is` : undefined;
    }
    case 'sysctl': {
      let current = '';
      try {
        current = readFileSync(rec.path, 'utf8');
      } catch {
        return undefined;
      }
      if (current.trim() !== rec.previous.trim()) writeFileSync(rec.path, rec.previous);
      return undefined;
    }
    case 'tun-device': {
      // Only a TUN device: never delete an interface of that name that is something else.
      let kind: string | undefined;
      try {
        const { stdout } = await runCommand('ip', ['-j', '-d', 'link', 'show', 'dev', rec.name]);
        const info = JSON.parse(stdout) as Array<{ linkinfo?: { info_kind?: string } }>;
        kind = info[0]?.linkinfo?.info_kind;
      } catch (err) {
        if (isMissing(err)) return undefined;
        throw err;
      }
      if (kind !== 'tun') return `${rec.name} is not a TUN device now; left alone`;
      await quiet('ip', ['link', 'del', 'dev', rec.name]);
      return undefined;
    }
  }
}

/**
 * Replacing /etc/resolv.conf while the tunnel is up, and putting back exactly
 * what was there: the same bytes, the same mode, and a symlink stays a
 * symlink (systemd-resolved and resolvconf make it one).
 *
 * - A regular file is rewritten in place (never renamed over): that also
 *   works where the file is a bind mount (containers, `ip netns exec`), which
 *   rename cannot replace.
 * - A symlink is replaced by a regular file (writing through it would change
 *   the resolver manager's own file, which it rewrites anyway).
 * - Restoring checks that the file still holds what we wrote: if something
 *   else (a DHCP client, the user) changed it since, that newer content wins
 *   and we leave it alone.
 *
 * The previous content is also saved to a backup file so a later run can
 * restore it after a crash (state.ts).
 */
import { createHash } from 'node:crypto';
import { chmodSync, lstatSync, readFileSync, readlinkSync, symlinkSync, unlinkSync, writeFileSync } from 'node:fs';
import { DshieldError, ErrorCodes } from '../errors.ts';
import { canonicalIp } from './nft.ts';

export const RESOLV_CONF = '/etc/resolv.conf';

/** What was at the path before we wrote it. */
export type ResolvPrevious =
  | { type: 'file'; mode: number }
  | { type: 'symlink'; target: string }
  | { type: 'none' };

export interface ResolvRecord {
  path: string;
  previous: ResolvPrevious;
  /** Where the previous bytes were saved ('file' only; a symlink's target is in `previous`). */
  backupFile?: string;
  /** SHA-256 (hex) of what we wrote, to recognise our own content on restore. */
  written: string;
}

function sha256(data: Buffer | string): string {
  return createHash('sha256').update(data).digest('hex');
}

/** The resolv.conf text for `servers` (and optional search domains). */
export function resolvConfText(servers: string[], search: string[] = []): string {
  if (servers.length === 0) throw new DshieldError(ErrorCodes.TUN, 'no DNS server given for the tunnel');
  const lines = ['# Written by dshield while the tunnel is up; the previous file comes back when it stops.'];
  for (const s of servers) lines.push(`nameserver ${canonicalIp(s).text}`);
  const domains = search.filter((d) => /^[A-Za-z0-9.-]{1,253}$/.test(d));
  if (domains.length > 0) lines.push(`search ${domains.join(' ')}`);
  return `${lines.join('\n')}\n`;
}

/** Look at the path and save what is there to `backupFile` (if a file). Changes nothing at `path`. */
export function snapshotResolv(path: string, backupFile: string): { previous: ResolvPrevious; backupFile?: string } {
  let st;
  try {
    st = lstatSync(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { previous: { type: 'none' } };
    throw err;
  }
  if (st.isSymbolicLink()) return { previous: { type: 'symlink', target: readlinkSync(path) } };
  if (!st.isFile()) throw new DshieldError(ErrorCodes.TUN, `${path} is neither a file nor a symlink; not replacing it`);
  writeFileSync(backupFile, readFileSync(path), { mode: 0o600 });
  return { previous: { type: 'file', mode: st.mode & 0o7777 }, backupFile };
}

/** Write `content` at the path (see the file comment for how). Returns the hash to record. */
export function writeResolv(path: string, previous: ResolvPrevious, content: string): string {
  if (previous.type === 'symlink') unlinkSync(path);
  if (previous.type === 'file') writeFileSync(path, content); // in place: keeps inode, mode and bind mounts
  else writeFileSync(path, content, { mode: 0o644 });
  return sha256(content);
}

/**
 * Put back what `rec` says was there. Returns 'restored', 'absent-ok' (nothing
 * of ours is there) or 'changed' (someone else rewrote it since: left alone).
 * Throws only when restoring itself fails.
 */
export function restoreResolv(rec: ResolvRecord): 'restored' | 'changed' | 'absent-ok' {
  let current: Buffer | undefined;
  let isLink = false;
  try {
    isLink = lstatSync(rec.path).isSymbolicLink();
    if (!isLink) current = readFileSync(rec.path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  const ours = current !== undefined && sha256(current) === rec.written;
  if (!ours) {
    // Never applied (a crash between journaling and writing), already restored, or rewritten by someone else.
    const untouched =
      (rec.previous.type === 'symlink' && isLink) ||
      (rec.previous.type === 'none' && current === undefined && !isLink) ||
      (rec.previous.type === 'file' && current !== undefined && rec.backupFile !== undefined && safeEquals(current, rec.backupFile));
    return untouched ? 'absent-ok' : 'changed';
  }
  switch (rec.previous.type) {
    case 'symlink':
      unlinkSync(rec.path);
      symlinkSync(rec.previous.target, rec.path);
      break;
    case 'none':
      unlinkSync(rec.path);
      break;
    case 'file': {
      if (rec.backupFile === undefined) throw new DshieldError(ErrorCodes.TUN, `no saved copy of ${rec.path} to restore`);
      writeFileSync(rec.path, readFileSync(rec.backupFile));
      chmodSync(rec.path, rec.previous.mode);
      break;
    }
  }
  return 'restored';
}

function safeEquals(current: Buffer, backupFile: string): boolean {
  try {
    return current.equals(readFileSync(backupFile));
  } catch {
    return false;
  }
}

/**
 * The things that are open right now (a server's sessions, say), for code
 * that adds and removes them all the time: add() and remove() in constant
 * time, by the ticket add() hands out.
 *
 * Why not a Set: when V8 rehashes a Set's or a Map's table, it keeps the old
 * table, and every entry it held, linked to the new one (so that an iterator
 * still walking the old table can carry on). Once one table of a long-lived
 * Set has been promoted to the old generation and replaced, every later
 * table hangs off it, so everything the Set has ever held survives every
 * scavenge until the next full GC, which dshield makes rare
 * (core/gc-tuning.ts). A server's Set of live sessions did exactly that:
 * ~8 KB of every finished handshake was promoted, and scavenges took about
 * 2.5 times as long (measured with node --trace-gc-nvp). An array keeps no
 * such chain: removing an entry clears its slot.
 */

/** What add() hands out; remove() takes it back. Holds nothing once removed. */
export interface RosterTicket<T> {
  readonly value: T | undefined;
}

interface Entry<T> extends RosterTicket<T> {
  value: T | undefined;
  /** Where the entry is in `entries`; -1 once removed. */
  index: number;
}

export class Roster<T> {
  private readonly entries: Entry<T>[] = [];

  get size(): number {
    return this.entries.length;
  }

  add(value: T): RosterTicket<T> {
    const entry: Entry<T> = { value, index: this.entries.length };
    this.entries.push(entry);
    return entry;
  }

  /** Removes the entry `ticket` stands for; a second call does nothing. */
  remove(ticket: RosterTicket<T>): void {
    const entry = ticket as Entry<T>;
    if (entry.index < 0 || this.entries[entry.index] !== entry) return;
    const last = this.entries.pop()!;
    if (last !== entry) {
      this.entries[entry.index] = last;
      last.index = entry.index;
    }
    entry.index = -1;
    entry.value = undefined;
  }

  /** The values now, in no particular order: a copy, so the roster may change while the caller goes through it. */
  values(): T[] {
    return this.entries.map((e) => e.value!);
  }
}

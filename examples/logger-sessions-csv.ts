/**
 * An example of a plugin of your own: a logger that appends one CSV line per
 * finished client session (time, client, address, bytes in, bytes out,
 * seconds) — a minimal accounting log. Name it in the config by path:
 *
 *   logging: ['console', { use: './examples/logger-sessions-csv.ts', file: 'logs/sessions.csv' }]
 */
import { appendFileSync, existsSync, mkdirSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { definePlugin } from '../core/define.ts';

export default definePlugin({
  kind: 'logger',
  name: 'sessions-csv',
  description: 'one CSV line per finished client session',
  options: {
    file: { type: 'string', description: 'CSV file, relative to the config file', default: 'logs/sessions.csv' },
  },
  create(options: { file: string }, ctx) {
    const path = resolve(ctx.baseDir, options.file);
    mkdirSync(dirname(path), { recursive: true });
    if (!existsSync(path)) appendFileSync(path, 'time,client,address,bytes_in,bytes_out,seconds\n');
    return {
      name: 'sessions-csv',
      log(record) {
        const f = record.fields;
        // Session summaries are the records that carry a client name and byte counts.
        if (!f || typeof f.client !== 'string' || typeof f.bytesIn !== 'number') return;
        const seconds = Number(f.durationMs ?? 0) / 1000;
        const line = [new Date(record.time).toISOString(), f.client, f.remote, f.bytesIn, f.bytesOut, seconds.toFixed(1)];
        appendFileSync(path, `${line.join(',')}\n`);
      },
    };
  },
});

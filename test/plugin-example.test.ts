/**
 * The README's "Writing a plugin" example, loaded by path from a config,
 * does its job in a real server: one CSV line per finished session.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT, stopAll } from './helpers/cli.ts';
import { curl } from './helpers/curl.ts';
import { startTunnel } from './helpers/tunnel.ts';
import { startWebServer } from './helpers/web.ts';

test.after(stopAll);

test('the example logger plugin from the README writes a CSV line per session', async () => {
  const web = await startWebServer(Buffer.alloc(0));
  const t = await startTunnel({
    extra: {
      logging: ['console', { use: join(ROOT, 'examples', 'logger-sessions-csv.ts'), file: 'logs/sessions.csv' }],
    },
  });
  const csv = join(t.dir, 'logs', 'sessions.csv');
  try {
    assert.is(await curl(['--socks5-hostname', t.socks, web.url('/hello')], 10_000), 'hello through the tunnel\n');
    await t.client.stop();
    const deadline = Date.now() + 10_000;
    while (Date.now() < deadline && !(existsSync(csv) && readFileSync(csv, 'utf8').split('\n').length > 2)) {
      await new Promise((r) => setTimeout(r, 100));
    }
    const lines = readFileSync(csv, 'utf8').trim().split('\n');
    assert.is(lines[0], 'time,client,address,bytes_in,bytes_out,seconds');
    assert.is(lines.length, 2, `one session line: ${lines.join(' | ')}`);
    const [, client, address, bytesIn, bytesOut] = lines[1]!.split(',');
    assert.is(client, 'e2e');
    assert.match(address!, /^127\.0\.0\.1:\d+$/);
    assert.ok(Number(bytesIn) > 0 && Number(bytesOut) > 0, 'bytes were counted');
  } finally {
    await t.close();
    await web.close();
  }
});

test.run();

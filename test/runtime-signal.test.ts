/**
 * core/runtime.ts: the runtime's shutdown signal is shared by everything
 * that must stop when dshield does (plugins, every outbound connect and
 * dial in flight), so a busy server has hundreds of listeners on it at
 * once. That is by design, and must not print Node's
 * MaxListenersExceededWarning ("Possible EventTarget memory leak") into
 * the user's log.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { loadConfig } from '../core/config.ts';
import { createRuntime } from '../core/runtime.ts';

test('hundreds of listeners on the shutdown signal: no MaxListenersExceededWarning, and all of them run on close', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'dshield-signal-'));
  const warnings: string[] = [];
  const onWarning = (w: Error) => warnings.push(`${w.name}: ${w.message}`);
  process.on('warning', onWarning);
  try {
    const config = await loadConfig({ cwd: dir, env: {}, materializeKeys: false });
    const rt = await createRuntime(config, { mode: 'server' });
    let ran = 0;
    for (let i = 0; i < 300; i++) rt.signal.addEventListener('abort', () => ran++, { once: true });
    // Node emits the warning on a later tick.
    await new Promise((resolve) => setTimeout(resolve, 50));
    await rt.close();
    assert.equal(warnings.filter((w) => w.startsWith('MaxListenersExceededWarning')), []);
    assert.is(ran, 300);
  } finally {
    process.off('warning', onWarning);
    rmSync(dir, { recursive: true, force: true });
  }
});

test.run();

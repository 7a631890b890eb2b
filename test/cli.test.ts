/**
 * The command line as a user meets it: help, version, key commands, invite,
 * check, precedence of file < environment < --set, and one clear line with
 * exit code 2 for every kind of mistake.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runCli, tempDir, writeConfig } from './helpers/cli.ts';
import { publicKeyFromPrivate } from '../core/x25519.ts';

const tmp = tempDir();
test.after(() => tmp.cleanup());

/** A user's mistake: exit 2, one line on stderr naming the problem, no stack trace. */
function assertOneLineError(r: { code: number | null; stderr: string }, pattern: RegExp): void {
  assert.is(r.code, 2, `exit code 2, got ${r.code}: ${r.stderr}`);
  const lines = r.stderr.trim().split('\n');
  assert.is(lines.length, 1, `one line, got:\n${r.stderr}`);
  assert.match(lines[0]!, /^dshield: DSHIELD_ERR_[A-Z_]+: /);
  assert.match(lines[0]!, pattern);
}

test('--help lists every mode, command and flag; --version prints the version', async () => {
  const r = await runCli(['--help']);
  assert.is(r.code, 0);
  for (const word of ['--mode server', '--mode client', '--mode local', 'keygen', 'pubkey', 'invite', 'check', '--config', '--set', '--invite', '--help', '--version', 'DSHIELD_']) {
    assert.ok(r.stdout.includes(word), `help mentions ${word}`);
  }
  const v = await runCli(['--version']);
  const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8'));
  assert.is(v.stdout.trim(), pkg.version);
});

test('usage mistakes: one line, exit 2', async () => {
  assertOneLineError(await runCli(['--frobnicate']), /unknown flag --frobnicate/);
  assertOneLineError(await runCli(['--mode']), /--mode needs a value/);
  assertOneLineError(await runCli(['--mode', 'banana']), /unknown mode "banana"/);
  assertOneLineError(await runCli([]), /choose a mode/);
  assertOneLineError(await runCli(['frob']), /unknown command "frob"/);
  assertOneLineError(await runCli(['--mode', 'server', '--set', 'novalue']), /--set needs KEY=VALUE/);
});

test('keygen prints a key pair; pubkey derives the same public key', async () => {
  const r = await runCli(['keygen']);
  assert.is(r.code, 0);
  const kp = JSON.parse(r.stdout) as { privateKey: string; publicKey: string };
  assert.is(Buffer.from(kp.privateKey, 'base64').length, 32);
  assert.is(Buffer.from(kp.publicKey, 'base64').length, 32);
  assert.is(publicKeyFromPrivate(Buffer.from(kp.privateKey, 'base64')).toString('base64'), kp.publicKey);
  const p = await runCli(['pubkey'], { input: `${kp.privateKey}\n` });
  assert.is(p.code, 0);
  assert.is(p.stdout.trim(), kp.publicKey);
  assertOneLineError(await runCli(['pubkey'], { input: 'not a key' }), /private key/);
});

test('check: precedence is defaults < file < environment < --set', async () => {
  const dir = join(tmp.dir, 'precedence');
  mkdirSync(dir, { recursive: true });
  const config = writeConfig(dir, { transport: 'tcp', client: { server: '10.1.1.1:1111', keepalive: 1000 }, server: { listen: '127.0.0.1:7000' } });
  const show = async (env: NodeJS.ProcessEnv, sets: string[] = []) => {
    const r = await runCli(['check', '--config', config, ...sets.flatMap((s) => ['--set', s])], { env });
    assert.is(r.code, 0, r.stderr);
    return JSON.parse(r.stdout.slice(r.stdout.indexOf('{'), r.stdout.lastIndexOf('}') + 1));
  };
  const fromFile = await show({});
  assert.is(fromFile.client.server, '10.1.1.1:1111');
  assert.is(fromFile.client.keepalive, 1000);
  assert.is(fromFile.client.connectWait, 10000, 'a default');
  const fromEnv = await show({ DSHIELD_CLIENT__SERVER: '10.2.2.2:2222', dshield_client__keepalive: '2000', DSHIELD_TRANSPORT: 'ws' });
  assert.is(fromEnv.client.server, '10.2.2.2:2222');
  assert.is(fromEnv.client.keepalive, 2000, 'env names match without regard to case; JSON numbers');
  assert.is(fromEnv.transport.use, 'ws');
  assert.is(fromEnv.server.listen, '127.0.0.1:7000', 'untouched keys keep the file value');
  const fromSet = await show({ DSHIELD_CLIENT__SERVER: '10.2.2.2:2222' }, ['client.server=10.3.3.3:3333', 'server.egress.allow=["127.0.0.0/8"]']);
  assert.is(fromSet.client.server, '10.3.3.3:3333');
  assert.equal(fromSet.server.egress.allow, ['127.0.0.0/8']);
});

test('check redacts keys', async () => {
  const r = await runCli(['check', '--set', 'client.privateKey=' + Buffer.alloc(32, 7).toString('base64')]);
  assert.is(r.code, 0, r.stderr);
  assert.not.ok(r.stdout.includes(Buffer.alloc(32, 7).toString('base64')), 'the private key was printed');
  assert.ok(r.stdout.includes('<redacted>'));
});

test('bad config: every kind gives one line and exit 2', async () => {
  const cases: [unknown, RegExp][] = [
    [{ server: { listne: '1.2.3.4:5' } }, /server\.listne.*did you mean "?server\.listen/],
    [{ client: { keepalive: 'often' } }, /client\.keepalive/],
    [{ server: { listen: 'nonsense' } }, /server\.listen/],
    [{ server: { egress: { allow: ['10.0.0.0/99'] } } }, /server\.egress\.allow/],
    [{ transport: 'carrier-pigeon' }, /unknown transport plugin "carrier-pigeon"/],
    [{ transport: { use: 'tcp', bogus: 1 } }, /transport plugin "tcp".*unknown option "bogus"/],
    [{ client: { privateKey: Buffer.alloc(31, 1).toString('base64') } }, /client\.privateKey/],
  ];
  for (const [i, [config, pattern]] of cases.entries()) {
    const path = writeConfig(tmp.dir, config, `bad-${i}.json`);
    assertOneLineError(await runCli(['check', '--config', path]), pattern);
  }
  assertOneLineError(await runCli(['check'], { env: { DSHIELD_CLIENT__SERVR: 'x' } }), /DSHIELD_CLIENT__SERVR/);
  assertOneLineError(await runCli(['check', '--config', join(tmp.dir, 'missing.json')]), /missing\.json/);
  const broken = join(tmp.dir, 'broken.json');
  writeFileSync(broken, '{ "transport": ');
  assertOneLineError(await runCli(['check', '--config', broken]), /broken\.json/);
});

test('a plugin file with a wrong export stops start-up with one line', async () => {
  const plugin = join(tmp.dir, 'not-a-plugin.ts');
  writeFileSync(plugin, 'export default { hello: "world" };\n');
  const r = await runCli(['check', '--set', `transport=${JSON.stringify(plugin)}`]);
  assertOneLineError(r, /not-a-plugin\.ts/);
  // And a real start stops at the same line.
  const s = await runCli(['--mode', 'local', '--set', `transport=${JSON.stringify(plugin)}`]);
  assertOneLineError(s, /not-a-plugin\.ts/);
});

test('invite: authorizes a new client and prints a string the client accepts', async () => {
  const dir = join(tmp.dir, 'invite');
  mkdirSync(dir, { recursive: true });
  const config = writeConfig(dir, { server: { listen: '127.0.0.1:9443', privateKey: 'keys/server.key', clientsFile: 'keys/clients.json' } });
  const r = await runCli(['invite', 'laptop', '--config', config]);
  assert.is(r.code, 0, r.stderr);
  const invite = r.stdout.trim();
  assert.match(invite, /^dshield:\/\//);
  const clients = JSON.parse(readFileSync(join(dir, 'keys', 'clients.json'), 'utf8')) as { name: string; publicKey: string }[];
  assert.is(clients.length, 1);
  assert.is(clients[0]!.name, 'laptop');
  assert.is(statSync(join(dir, 'keys', 'server.key')).mode & 0o777, 0o600, 'server key written 0600');
  assertOneLineError(await runCli(['invite', 'laptop', '--config', config]), /laptop/);

  // The client side: the invite alone names the server, its key and the client's key.
  const elsewhere = join(tmp.dir, 'elsewhere');
  mkdirSync(elsewhere, { recursive: true });
  const c = await runCli(['check', '--invite', invite], { cwd: elsewhere });
  assert.is(c.code, 0, c.stderr);
  const shown = JSON.parse(c.stdout.slice(c.stdout.indexOf('{'), c.stdout.lastIndexOf('}') + 1));
  assert.is(shown.client.server, '127.0.0.1:9443');
  assert.is(shown.client.serverPublicKey, readFileSync(join(dir, 'keys', 'server.pub'), 'utf8').trim());
  assert.not.ok(existsSync(join(elsewhere, 'keys')), 'check creates no key files');
  assertOneLineError(await runCli(['check', '--invite', 'dshield://garbage'], { cwd: elsewhere }), /invite/i);
});

test.run();

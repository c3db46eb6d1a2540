'use strict';
// TLS with the unchanged official Node.js client (rocketmq-client-nodejs 1.0.8): sslEnabled
// against `sluice local --tls-cert --tls-key`, with a certificate made by `openssl` for
// 127.0.0.1. The client takes no CA of its own: grpc-js's ChannelCredentials.createSsl() uses
// the default roots, which GRPC_DEFAULT_SSL_ROOTS_FILE_PATH names. grpc-js reads that variable
// when it is loaded, so the certificates are made and the variable set before the client is
// required (node --test runs each file in its own process).
//
// Environment: SLUICE_BIN (default <repo>/target/debug/sluice), SLUICE_NODE_ARTIFACT_DIR.

const assert = require('node:assert/strict');
const { after, before, test } = require('node:test');
const { execFileSync, spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');
const crypto = require('node:crypto');

const REPO = path.resolve(__dirname, '..', '..', '..');
const SLUICE = process.env.SLUICE_BIN || path.join(REPO, 'target', 'debug', 'sluice');
const ARTIFACTS = process.env.SLUICE_NODE_ARTIFACT_DIR || fs.mkdtempSync(path.join(os.tmpdir(), 'sluice-node-'));
const START_TIMEOUT_MS = 60_000;
const AWAIT_MS = 2_000;
const INVISIBLE_MS = 30_000;

const certs = fs.mkdtempSync(path.join(os.tmpdir(), 'sluice-node-tls-'));
function openssl(...args) {
  execFileSync('openssl', args, { cwd: certs, stdio: ['ignore', 'ignore', 'pipe'], timeout: 60_000 });
}
const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
openssl('req', '-x509', ...ec, '-days', '2', '-keyout', 'ca.key', '-out', 'ca.pem', '-subj', '/CN=sluice-test-ca',
  '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign');
openssl('req', ...ec, '-keyout', 'server.key', '-out', 'server.csr', '-subj', '/CN=localhost');
fs.writeFileSync(path.join(certs, 'server.ext'),
  'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n');
openssl('x509', '-req', '-in', 'server.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-days', '2',
  '-extfile', 'server.ext', '-out', 'server.pem');
process.env.GRPC_DEFAULT_SSL_ROOTS_FILE_PATH = path.join(certs, 'ca.pem');

const { Producer, SimpleConsumer } = require('rocketmq-client-nodejs');

const logger = {
  info() {},
  debug() {},
  warn: (...a) => console.warn('[rocketmq warn]', ...a),
  error: (...a) => console.error('[rocketmq error]', ...a),
};

let server;
let endpoint;
let dataDir;
const stderrPath = path.join(ARTIFACTS, 'sluice-local-tls.stderr.log');

before(async () => {
  dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'sluice-node-tls-data-'));
  const stderr = fs.openSync(stderrPath, 'a');
  server = spawn(SLUICE, ['--json', 'local', '--data-dir', dataDir, '--grpc', '127.0.0.1:0', '--http', '127.0.0.1:0',
    '--tls-cert', path.join(certs, 'server.pem'), '--tls-key', path.join(certs, 'server.key')],
  { stdio: ['ignore', 'pipe', stderr] });
  endpoint = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('sluice local did not start')), START_TIMEOUT_MS);
    server.once('exit', code => reject(new Error(`sluice local exited with ${code}`)));
    readline.createInterface({ input: server.stdout }).on('line', line => {
      try {
        const value = JSON.parse(line);
        if (value.role === 'proxy' && value.grpc) {
          assert.equal(value.tls, true, 'the proxy says TLS is on');
          clearTimeout(timer);
          resolve(value.grpc);
        }
      } catch (e) {
        if (e instanceof assert.AssertionError) reject(e);
      }
    });
  });
});

after(async () => {
  if (server && server.exitCode === null) {
    const exited = new Promise(resolve => server.once('exit', resolve));
    server.kill('SIGTERM');
    await exited;
  }
  fs.rmSync(dataDir, { recursive: true, force: true });
  fs.rmSync(certs, { recursive: true, force: true });
});

function createTopic(name) {
  execFileSync(SLUICE, ['topic', 'create', name, '--type', 'normal', '--endpoint', endpoint,
    '--tls-ca', path.join(certs, 'ca.pem')], { encoding: 'utf8', timeout: 60_000 });
}

test('TLS: sslEnabled sends and receives through the TLS port', async () => {
  const topic = `t_${crypto.randomBytes(5).toString('hex')}`;
  createTopic(topic);
  const producer = new Producer({ endpoints: endpoint, namespace: '', logger, sslEnabled: true });
  const consumer = new SimpleConsumer({
    endpoints: endpoint, namespace: '', consumerGroup: `g_${crypto.randomBytes(5).toString('hex')}`, logger,
    subscriptions: new Map([[ topic, '*' ]]), awaitDuration: AWAIT_MS, sslEnabled: true,
  });
  try {
    await producer.startup();
    const bodies = ['over-tls-1', 'over-tls-2'];
    for (const body of bodies) {
      await producer.send({ topic, body: Buffer.from(body) });
    }
    await consumer.startup();
    const got = [];
    const deadline = Date.now() + 30_000;
    while (got.length < bodies.length && Date.now() < deadline) {
      for (const mv of await consumer.receive(16, INVISIBLE_MS)) {
        got.push(mv.body.toString());
        await consumer.ack(mv);
      }
    }
    assert.deepEqual(got.sort(), bodies);
  } finally {
    await producer.shutdown().catch(() => {});
    await consumer.shutdown().catch(() => {});
  }
});

test('TLS: a client without sslEnabled is refused, and the proxy log says why', async () => {
  const topic = `t_${crypto.randomBytes(5).toString('hex')}`;
  createTopic(topic);
  const producer = new Producer({ endpoints: endpoint, namespace: '', logger, topics: [ topic ], requestTimeout: 3_000 });
  await assert.rejects(producer.startup(), 'a plaintext producer started against the TLS port');
  await producer.shutdown().catch(() => {});
  assert.match(fs.readFileSync(stderrPath, 'utf8'), /without TLS to the gRPC port/);
});

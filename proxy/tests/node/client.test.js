'use strict';
// The unchanged official Apache RocketMQ 5 Node.js client (rocketmq-client-nodejs 1.0.8 from
// npm) against a `sluice local` this file starts: FIFO, delay and transactional messages, and
// lite topics (LitePushConsumer).
//
// Every wait is bounded. The only time-based assertion checks that a delay message is *not*
// handed out before its time. Run by scripts/node-client-tests.sh (node --test).
//
// Environment: SLUICE_BIN (default <repo>/target/debug/sluice), SLUICE_NODE_ARTIFACT_DIR (where
// the server's output goes).

const assert = require('node:assert/strict');
const { after, before, test } = require('node:test');
const { execFileSync, spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');
const crypto = require('node:crypto');

const { ConsumeResult, LitePushConsumerBuilder, Producer, SimpleConsumer } = require('rocketmq-client-nodejs');
// Not re-exported from the package root in 1.0.8.
const { TransactionResolution } = require('rocketmq-client-nodejs/proto/apache/rocketmq/v2/definition_pb');

const REPO = path.resolve(__dirname, '..', '..', '..');
const SLUICE = process.env.SLUICE_BIN || path.join(REPO, 'target', 'debug', 'sluice');
const ARTIFACTS = process.env.SLUICE_NODE_ARTIFACT_DIR || fs.mkdtempSync(path.join(os.tmpdir(), 'sluice-node-'));
const START_TIMEOUT_MS = 60_000;
const AWAIT_MS = 2_000; // SimpleConsumer long polling
const INVISIBLE_MS = 30_000;
const EARLY_TOLERANCE_MS = 250;

// The client logs to ~/logs by default; keep its warnings, drop the chatter.
const logger = {
  info() {},
  debug() {},
  warn: (...a) => console.warn('[rocketmq warn]', ...a),
  error: (...a) => console.error('[rocketmq error]', ...a),
};

let server;
let endpoint;
let dataDir;

function unique(prefix) {
  return `${prefix}_${crypto.randomBytes(5).toString('hex')}`;
}

function sluice(...args) {
  return execFileSync(SLUICE, [...args, '--endpoint', endpoint], { encoding: 'utf8', timeout: 60_000 });
}

before(async () => {
  // The broker preallocates its segments (GiBs): the directory goes when the tests end.
  dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'sluice-node-data-'));
  const data = dataDir;
  const stderr = fs.openSync(path.join(ARTIFACTS, 'sluice-local.stderr.log'), 'a');
  server = spawn(SLUICE, ['--json', 'local', '--data-dir', data, '--grpc', '127.0.0.1:0', '--http', '127.0.0.1:0'],
    { stdio: ['ignore', 'pipe', stderr] });
  endpoint = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('sluice local did not start')), START_TIMEOUT_MS);
    server.once('exit', code => reject(new Error(`sluice local exited with ${code}`)));
    readline.createInterface({ input: server.stdout }).on('line', line => {
      try {
        const value = JSON.parse(line);
        if (value.role === 'proxy' && value.grpc) {
          clearTimeout(timer);
          resolve(value.grpc);
        }
      } catch (_) { /* not JSON */ }
    });
  });
});

after(async () => {
  if (server && server.exitCode === null) {
    const exited = new Promise(resolve => server.once('exit', resolve));
    server.kill('SIGTERM');
    await exited;
  }
  if (dataDir) {
    fs.rmSync(dataDir, { recursive: true, force: true });
  }
  // The 1.0.8 lite consume services open a default file logger (egg-logger) whatever logger
  // they are given, and nothing closes it: its flush interval would keep this file's process
  // alive for ever. Every test has finished and reported by now.
  setTimeout(() => process.exit(), 2_000).unref();
});

async function started(client) {
  await client.startup();
  return client;
}

async function shutdown(...clients) {
  for (const c of clients) {
    try {
      await c.shutdown();
    } catch (e) {
      console.warn('shutdown:', e.message);
    }
  }
}

/** Receives (and acks) until `want` messages came or `withinMs` passed; returns every batch. */
async function drain(consumer, want, withinMs, batch = 16) {
  const batches = [];
  let count = 0;
  const deadline = Date.now() + withinMs;
  while (count < want && Date.now() < deadline) {
    const views = await consumer.receive(batch, INVISIBLE_MS);
    for (const mv of views) {
      await consumer.ack(mv);
    }
    if (views.length) {
      batches.push(views);
      count += views.length;
    }
  }
  return batches;
}

function consumerFor(topic, group) {
  return new SimpleConsumer({
    endpoints: endpoint, namespace: '', consumerGroup: group, logger,
    subscriptions: new Map([[ topic, '*' ]]), awaitDuration: AWAIT_MS,
  });
}

test('FIFO: each message group arrives in send order, one in flight at a time', async () => {
  const topic = unique('fifo');
  const group = unique('g');
  sluice('topic', 'create', topic, '--type', 'fifo', '--queues', '4');
  sluice('group', 'create', group, '--fifo');
  const producer = await started(new Producer({ endpoints: endpoint, namespace: '', topic, logger }));
  const consumer = await started(consumerFor(topic, group));
  try {
    const groups = [ 'a', 'b', 'c' ];
    const sent = {};
    for (let i = 0; i < 5; i++) {
      for (const g of groups) {
        const body = `${g}:${i}`;
        await producer.send({ topic, messageGroup: g, body: Buffer.from(body) });
        (sent[g] = sent[g] || []).push(body);
      }
    }
    const batches = await drain(consumer, 15, 60_000, 8);
    const got = {};
    for (const views of batches) {
      const inBatch = views.map(mv => mv.messageGroup);
      assert.equal(new Set(inBatch).size, inBatch.length, `two messages of one group in flight: ${inBatch}`);
      for (const mv of views) {
        (got[mv.messageGroup] = got[mv.messageGroup] || []).push(mv.body.toString());
      }
    }
    assert.deepEqual(got, sent);
  } finally {
    await shutdown(consumer, producer);
  }
});

test('priority: a backlog arrives highest priority first', async () => {
  const topic = unique('prio');
  const group = unique('g');
  sluice('topic', 'create', topic, '--type', 'priority', '--queues', '4');
  const producer = await started(new Producer({ endpoints: endpoint, namespace: '', topic, logger }));
  try {
    for (let i = 0; i < 40; i++) {
      const priority = (i * 7) % 5;
      await producer.send({ topic, priority, body: Buffer.from(`${priority}:${i}`) });
    }
  } finally {
    await shutdown(producer);
  }
  // The backlog is complete before the group first receives: priority decides all of it.
  const consumer = await started(consumerFor(topic, group));
  try {
    const batches = await drain(consumer, 40, 60_000, 1);
    const got = batches.flat().map(mv => [ mv.getPriority() ?? 0, mv.body.toString() ]);
    assert.equal(got.length, 40);
    const priorities = got.map(([ p ]) => p);
    assert.deepEqual(priorities, [ ...priorities ].sort((a, b) => b - a), 'highest priority first');
    for (const [ p, body ] of got) {
      assert.equal(body.split(':')[0], String(p), 'priority kept');
    }
  } finally {
    await shutdown(consumer);
  }
});

test('delay: not delivered before its time', async () => {
  const topic = unique('delay');
  const group = unique('g');
  sluice('topic', 'create', topic, '--type', 'delay', '--queues', '2');
  const producer = await started(new Producer({ endpoints: endpoint, namespace: '', topic, logger }));
  const consumer = await started(consumerFor(topic, group));
  try {
    const due = Date.now() + 2_000;
    await producer.send({ topic, body: Buffer.from('later'), deliveryTimestamp: new Date(due) });
    const deadline = Date.now() + 30_000;
    let views = [];
    while (!views.length && Date.now() < deadline) {
      views = await consumer.receive(16, INVISIBLE_MS);
    }
    assert.ok(Date.now() + EARLY_TOLERANCE_MS >= due, `delivered ${due - Date.now()} ms early`);
    assert.deepEqual(views.map(mv => mv.body.toString()), [ 'later' ]);
    await consumer.ack(views[0]);
  } finally {
    await shutdown(consumer, producer);
  }
});

test('transactions: commit, rollback, and a check-back the checker commits', async () => {
  const topic = unique('tx');
  const group = unique('g');
  sluice('topic', 'create', topic, '--type', 'transaction', '--queues', '2');
  const checked = [];
  const checker = {
    async check(mv) {
      checked.push(mv.messageId);
      return TransactionResolution.COMMIT;
    },
  };
  const producer = await started(new Producer({ endpoints: endpoint, namespace: '', topic, logger, checker }));
  const consumer = await started(consumerFor(topic, group));
  try {
    const committed = producer.beginTransaction();
    await producer.send({ topic, body: Buffer.from('committed') }, committed);
    const rolledBack = producer.beginTransaction();
    await producer.send({ topic, body: Buffer.from('rolled back') }, rolledBack);
    const orphan = producer.beginTransaction();
    const orphanReceipt = await producer.send({ topic, body: Buffer.from('checked back') }, orphan);

    assert.deepEqual(await consumer.receive(16, INVISIBLE_MS), [], 'half messages are invisible');
    await committed.commit();
    await rolledBack.rollback();
    // Never ended by the producer: the server asks its checker, which commits.
    const batches = await drain(consumer, 2, 120_000);
    const bodies = batches.flat().map(mv => mv.body.toString()).sort();
    assert.deepEqual(bodies, [ 'checked back', 'committed' ]);
    assert.ok(checked.includes(orphanReceipt.messageId), `checked: ${checked}`);
    assert.deepEqual(await consumer.receive(16, INVISIBLE_MS), [], 'the rolled-back message never comes');
  } finally {
    await shutdown(consumer, producer);
  }
});

test('lite: a LitePushConsumer gets only its own lite topics, each in send order', async () => {
  const topic = unique('lite');
  sluice('topic', 'create', topic, '--type', 'lite', '--queues', '4');
  const group = unique('g');
  const sessions = [ 0, 1, 2 ].map(i => `${crypto.randomUUID()}-${i}`);
  const other = crypto.randomUUID(); // written to, never subscribed
  const perSession = 15;
  const expected = sessions.length * perSession;
  const got = {};
  let total = 0;
  let finished;
  const done = new Promise(resolve => { finished = resolve; });
  const consumer = await new LitePushConsumerBuilder()
    .setClientConfiguration({ endpoints: endpoint, namespace: '', logger })
    .setConsumerGroup(group)
    .bindTopic(topic)
    .setMessageListener({
      consume(mv) {
        (got[mv.liteTopic] = got[mv.liteTopic] || []).push(mv.body.toString());
        total += 1;
        if (total >= expected) finished();
        return ConsumeResult.SUCCESS;
      },
    })
    .build();
  const producer = await started(new Producer({ endpoints: endpoint, namespace: '', topic, logger }));
  try {
    for (const s of sessions) {
      await consumer.subscribeLite(s);
    }
    const sent = {};
    for (let i = 0; i < perSession; i++) {
      for (const s of [ ...sessions, other ]) {
        const body = `token-${i}`;
        await producer.send({ topic, liteTopic: s, body: Buffer.from(body) });
        (sent[s] = sent[s] || []).push(body);
      }
    }
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`consumed ${total} of ${expected}`)), 120_000);
    });
    await Promise.race([ done, timeout ]).finally(() => clearTimeout(timer));
    assert.deepEqual(Object.keys(got).sort(), [ ...sessions ].sort(), 'only subscribed lite topics are delivered');
    for (const s of sessions) {
      assert.deepEqual(got[s], sent[s], 'a token stream stays a stream');
    }
  } finally {
    await shutdown(consumer, producer);
  }
});

// The vhost-user frontend reconnecting to a backend that went away: a new connection, the
// whole session again (a new backend process knows nothing), the same shared memory in
// SET_MEM_TABLE, and loss reports only from the connection in use. A scripted backend
// stands in for the socket; the real restarts are in e2e/driver-reconnect.test.ts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { VblkError } from '../src/errors.js';
import { VIRTIO_F, features } from '../src/spec/virtio.js';
import { VHOST_USER_F_PROTOCOL_FEATURES, VHOST_USER_PROTOCOL_F } from '../src/spec/vhost-user.js';
import { VhostUserFrontend, type FrontendChannel, type FrontendIo, type Notifier } from '../src/transport/vhost-user/frontend.js';
import type { BackendReply, FrontendRequest } from '../src/transport/vhost-user/messages.js';

const MEMORY = 1 << 20;
const MEMFD = 42;

/** One connection to the scripted backend: what it was asked, and how to lose it. */
interface ScriptedChannel extends FrontendChannel {
  readonly requests: FrontendRequest[];
  lose(reason: Error): void;
}

function channel(): ScriptedChannel {
  const requests: FrontendRequest[] = [];
  const listeners: ((reason: Error) => void)[] = [];
  let lost: Error | null = null;
  const reply = (req: FrontendRequest): BackendReply | null => {
    switch (req.request) {
      case 'GET_FEATURES':
        return { request: req.request, features: features(VIRTIO_F.VERSION_1, VHOST_USER_F_PROTOCOL_FEATURES) };
      case 'GET_PROTOCOL_FEATURES':
        return { request: req.request, features: features(VHOST_USER_PROTOCOL_F.CONFIG) };
      default:
        return null;
    }
  };
  return {
    requests,
    call: async (req) => {
      if (lost) throw lost;
      requests.push(req);
      return reply(req);
    },
    onLost: (l) => listeners.push(l),
    close: () => {
      lost ??= new VblkError('CLOSED', 'closed');
    },
    lose(reason) {
      lost = reason;
      for (const l of listeners.splice(0)) l(reason);
    },
  };
}

function scriptedIo(): { io: FrontendIo; channels: ScriptedChannel[]; refuse: { next: boolean } } {
  const channels = [channel()];
  const refuse = { next: false };
  const notifier = (): Notifier => ({ fd: -1, signal: () => {}, watch: () => ({ stop: () => {} }), close: () => {} });
  const io: FrontendIo = {
    channel: channels[0],
    reconnect: async () => {
      if (refuse.next) throw new VblkError('CONNECT_FAILED', 'cannot connect: ECONNREFUSED');
      const c = channel();
      channels.push(c);
      return c;
    },
    createNotifier: notifier,
    createSharedMemory: (size) => ({ fd: MEMFD, address: MEMORY, bytes: new Uint8Array(size), release: () => {} }),
    openBackendChannel: () => ({ fd: -1, close: () => {} }),
  };
  return { io, channels, refuse };
}

test('reconnecting runs the whole session again on a new connection, with the same shared memory', async () => {
  const s = scriptedIo();
  const f = await VhostUserFrontend.open(s.io, { memorySize: MEMORY });
  try {
    const losses: string[] = [];
    f.onDeviceLost((r) => losses.push(r.message));
    s.channels[0].lose(new VblkError('DISCONNECTED', 'the vhost-user backend closed the connection'));
    assert.deepEqual(losses, ['the vhost-user backend closed the connection']);
    await f.reconnect();
    const names = (c: ScriptedChannel): string[] => c.requests.map((r) => r.request);
    assert.deepEqual(names(s.channels[1]), names(s.channels[0]), 'the same session as the first time');
    const table = s.channels[1].requests.find((r) => r.request === 'SET_MEM_TABLE');
    assert.ok(table?.request === 'SET_MEM_TABLE');
    assert.deepEqual(table.regions.map((r) => [r.fd, r.guestAddress, r.size]), [[MEMFD, MEMORY, MEMORY]]);
    // A listener registered after the reconnection hears of the new connection's loss, once.
    f.onDeviceLost((r) => losses.push(`again: ${r.message}`));
    s.channels[0].lose(new VblkError('DISCONNECTED', 'late news from the old connection'));
    s.channels[1].lose(new VblkError('DISCONNECTED', 'gone again'));
    assert.deepEqual(losses, ['the vhost-user backend closed the connection', 'again: gone again']);
  } finally {
    await f.close();
  }
});

test('a reconnection nobody answers rejects, and a later one succeeds', async () => {
  const s = scriptedIo();
  const f = await VhostUserFrontend.open(s.io, { memorySize: MEMORY });
  try {
    s.channels[0].lose(new VblkError('DISCONNECTED', 'gone'));
    s.refuse.next = true;
    await assert.rejects(f.reconnect(), /ECONNREFUSED/);
    s.refuse.next = false;
    await f.reconnect();
    assert.equal(s.channels.length, 2);
    assert.equal(await f.maxQueues(), 1);
  } finally {
    await f.close();
  }
});

test('a closed frontend does not reconnect', async () => {
  const s = scriptedIo();
  const f = await VhostUserFrontend.open(s.io, { memorySize: MEMORY });
  await f.close();
  await assert.rejects(f.reconnect(), (e) => (e as VblkError).code === 'CLOSED');
});

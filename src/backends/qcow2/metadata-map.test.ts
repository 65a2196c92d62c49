import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Qcow2Header } from './header.js';
import { MetadataMap } from './metadata-map.js';
import type { Refcounts } from './refcounts.js';

const CS = 65536;

function l1Of(...clusters: number[]): Uint8Array {
  const l1 = new Uint8Array(8 * clusters.length);
  const v = new DataView(l1.buffer);
  clusters.forEach((c, i) => {
    // COPIED set, as an image's own L2 tables have it: the map takes the offset only.
    v.setUint32(8 * i, c === 0 ? 0 : 0x8000_0000 + Math.floor((c * CS) / 2 ** 32));
    v.setUint32(8 * i + 4, (c * CS) >>> 0);
  });
  return l1;
}

test('the metadata map follows replaced headers, L1 tables and refcount tables, and L1 entry changes one by one', () => {
  let header = { l1TableOffset: 3 * CS, l1Size: 4, nbSnapshots: 0, snapshotsOffset: 0 } as Qcow2Header;
  let l1 = l1Of(5, 0, 6, 0);
  const rc = { changes: 0, tableOffset: CS, table: new Uint8Array(CS), blockClusters: () => [2] } as unknown as Refcounts & { changes: number; blockClusters(): number[] };
  const map = new MetadataMap({ clusterSize: CS, header: () => header, l1: () => l1, refcounts: () => rc });
  const meta = (): number[] => Array.from({ length: 16 }, (_, c) => c).filter((c) => map.has(c));
  assert.deepEqual(meta(), [0, 1, 2, 3, 5, 6]);
  assert.equal(map.isRefcountBlock(2), true);
  assert.equal(map.isRefcountBlock(5), false);

  // An L1 entry moves to a new L2 table (copy on write), one is set, one cleared.
  map.l1EntryChanged(5 * CS, 7 * CS);
  map.l1EntryChanged(0, 8 * CS);
  map.l1EntryChanged(6 * CS, 0);
  assert.deepEqual(meta(), [0, 1, 2, 3, 7, 8]);

  // A damaged image with two entries on one table: it stays metadata until both leave it.
  l1 = l1Of(9, 9);
  assert.deepEqual(meta(), [0, 1, 2, 3, 9]);
  map.l1EntryChanged(9 * CS, 0);
  assert.equal(map.has(9), true);
  map.l1EntryChanged(9 * CS, 0);
  assert.equal(map.has(9), false);

  // A resize moves the L1 table: a new header object, whatever was cached before.
  header = { ...header, l1TableOffset: 10 * CS, l1Size: 8192 * 2 };
  assert.deepEqual(meta(), [0, 1, 2, 10, 11]);

  // A new refcount block.
  rc.blockClusters = () => [2, 12];
  rc.changes++;
  assert.deepEqual(meta(), [0, 1, 2, 10, 11, 12]);
  assert.equal(map.isRefcountBlock(12), true);
});

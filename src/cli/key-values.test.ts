import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { CliUsageError } from './args.js';
import { parseKeyValues } from './key-values.js';

const WHAT = 'vblk serve: --backend-opt';

test('KEY=VALUE pairs become an object; a value may be empty or hold =', () => {
  assert.deepEqual(parseKeyValues(WHAT, []), {});
  assert.deepEqual(parseKeyValues(WHAT, ['url=http://h/x?a=1&b=2', 'size=64M', 'empty=', 'a.b-c_d=1']), {
    url: 'http://h/x?a=1&b=2', size: '64M', empty: '', 'a.b-c_d': '1',
  });
});

test('a missing =, a key that is not a name, and a repeated key are one-line usage errors', () => {
  const fails = (items: string[], message: RegExp) => assert.throws(() => parseKeyValues(WHAT, items),
    (e: unknown) => e instanceof CliUsageError && message.test(e.message) && !e.message.includes('\n'));
  fails(['size'], /^vblk serve: --backend-opt must be KEY=VALUE .*got "size"$/);
  fails(['=1'], /got "=1"/);
  fails(['__proto__=x'], /got "__proto__=x"/);
  fails(['1a=x'], /got "1a=x"/);
  fails(['a b=x'], /got "a b=x"/);
  fails(['line\nbreak=x'], /got "line\\nbreak=x"/);
  fails(['k=1', 'k=2'], /^vblk serve: --backend-opt: k is given more than once$/);
});

test('property: any list of strings parses to own string values or fails with a one-line CliUsageError', () => {
  fc.assert(fc.property(fc.array(fc.oneof(fc.string(), fc.tuple(fc.string(), fc.string()).map(([k, v]) => `${k}=${v}`))), (items) => {
    let parsed: Record<string, string>;
    try {
      parsed = parseKeyValues(WHAT, items);
    } catch (e) {
      assert.ok(e instanceof CliUsageError, String(e));
      assert.ok(!e.message.includes('\n'));
      return;
    }
    assert.equal(Object.getPrototypeOf(parsed), Object.prototype);
    assert.equal(Object.keys(parsed).length, items.length);
    for (const item of items) {
      const eq = item.indexOf('=');
      assert.equal(parsed[item.slice(0, eq)], item.slice(eq + 1));
    }
  }), { numRuns: 2000 });
});

// Filter specs are outside input (a command line): any text either parses into a checked
// spec or is refused with a FilterSpecError whose message is one line; well-formed specs
// parse into exactly the options they spell; applyFilters stacks in the order given.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { MemoryBackend } from '../memory-backend.js';
import { CowFilter } from './cow.js';
import { ErrorFilter } from './error.js';
import { FILTER_OPS, FilterSpecError } from './options.js';
import { FILTER_HELP, applyFilters, filtersOf, parseFilterSpec, type FilterSpec } from './registry.js';
import { StatsFilter } from './stats.js';
import { ThrottleFilter } from './throttle.js';

function refusal(text: string): FilterSpecError {
  try {
    parseFilterSpec(text);
  } catch (e) {
    assert.ok(e instanceof FilterSpecError, `${JSON.stringify(text)} threw ${String(e)}`);
    return e;
  }
  assert.fail(`${JSON.stringify(text)} was accepted`);
}

test('property: any text parses or is refused with a one-line FilterSpecError', () => {
  const pieces = fc.constantFrom(
    'cow', 'error', 'delay', 'throttle', 'stats', 'nope', ':', ',', '=', '+', '-', '%', '.', 'K', 'M', 'ms', 's', 'us',
    'block', 'file', 'ops', 'sectors', 'nth', 'rate', 'seed', 'status', 'read', 'write', 'flush', 'discard', 'zero',
    'iops', 'bps', 'burst', 'read-iops', 'write-bps', 'ioerr', 'unsupp', '0', '1', '7', '4096', '64K', '0.5', '\n', '"', ' ',
    '99999999999999999999', '\u0000', 'é',
  );
  const text = fc.oneof(fc.string(), fc.array(pieces, { maxLength: 12 }).map((p) => p.join('')));
  fc.assert(fc.property(text, (t) => {
    try {
      const spec = parseFilterSpec(t);
      assert.equal(spec.text, t);
    } catch (e) {
      assert.ok(e instanceof FilterSpecError, String(e));
      assert.ok(!/[\n\r\u0000]/.test(e.message), JSON.stringify(e.message));
      assert.ok(e.message.length > 0);
    }
  }), { numRuns: 3000 });
});

/** A well-formed spec, as text and as the options it must parse into. */
const specArb: fc.Arbitrary<{ text: string; expected: FilterSpec }> = fc.oneof(
  fc.record({ kib: fc.option(fc.integer({ min: 0, max: 14 }), { nil: undefined }), file: fc.option(fc.stringMatching(/^[a-zA-Z0-9/._=-]+$/), { nil: undefined }) })
    .map(({ kib, file }) => {
      const pairs: string[] = [];
      if (kib !== undefined) pairs.push(`block=${2 ** kib}K`);
      if (file !== undefined) pairs.push(`file=${file}`);
      const text = pairs.length === 0 ? 'cow' : `cow:${pairs.join(',')}`;
      return { text, expected: { name: 'cow', text, options: { granularity: kib === undefined ? undefined : 2 ** kib * 1024, file } } as FilterSpec };
    }),
  fc.record({
    ops: fc.option(fc.subarray([...FILTER_OPS], { minLength: 1 }), { nil: undefined }),
    sectors: fc.option(fc.array(fc.tuple(fc.nat(), fc.nat({ max: 100 })), { minLength: 1, maxLength: 4 }), { nil: undefined }),
    nth: fc.option(fc.integer({ min: 1, max: 1000 }), { nil: undefined }),
    percent: fc.option(fc.integer({ min: 0, max: 100 }), { nil: undefined }),
    seed: fc.option(fc.nat(), { nil: undefined }),
    status: fc.option(fc.constantFrom('ioerr' as const, 'unsupp' as const), { nil: undefined }),
  }).map(({ ops, sectors, nth, percent, seed, status }) => {
    const pairs: string[] = [];
    if (ops) pairs.push(`ops=${ops.join('+')}`);
    if (sectors) pairs.push(`sectors=${sectors.map(([f, n]) => (n === 0 ? `${f}` : `${f}-${f + n}`)).join('+')}`);
    if (nth !== undefined) pairs.push(`nth=${nth}`);
    if (percent !== undefined) pairs.push(`rate=${percent}%`);
    if (seed !== undefined) pairs.push(`seed=${seed}`);
    if (status) pairs.push(`status=${status}`);
    const text = pairs.length === 0 ? 'error' : `error:${pairs.join(',')}`;
    return {
      text,
      expected: {
        name: 'error', text, options: {
          ops, sectors: sectors?.map(([f, n]) => ({ first: f, last: f + n })), nth,
          rate: percent === undefined ? undefined : percent / 100, seed, status,
        },
      } as FilterSpec,
    };
  }),
  fc.record({
    read: fc.option(fc.nat({ max: 5000 }), { nil: undefined }),
    zero: fc.option(fc.nat({ max: 5000 }), { nil: undefined }),
  }).map(({ read, zero }) => {
    const pairs: string[] = [];
    if (read !== undefined) pairs.push(`read=${read}us`);
    if (zero !== undefined) pairs.push(`zero=${zero}ms`);
    const text = pairs.length === 0 ? 'delay' : `delay:${pairs.join(',')}`;
    return {
      text,
      expected: {
        name: 'delay', text, options: {
          read: read === undefined ? undefined : read / 1000, write: undefined, flush: undefined, discard: undefined, zero,
        },
      } as FilterSpec,
    };
  }),
  fc.record({ iops: fc.integer({ min: 1, max: 1e6 }), mib: fc.option(fc.integer({ min: 1, max: 1024 }), { nil: undefined }) })
    .map(({ iops, mib }) => {
      const text = `throttle:iops=${iops}${mib === undefined ? '' : `,write-bps=${mib}M`}`;
      return {
        text,
        expected: {
          name: 'throttle', text, options: {
            iops, readIops: undefined, writeIops: undefined, bps: undefined, readBps: undefined,
            writeBps: mib === undefined ? undefined : mib * 2 ** 20, burst: undefined,
          },
        } as FilterSpec,
      };
    }),
  fc.constant({ text: 'stats', expected: { name: 'stats', text: 'stats', options: {} } as FilterSpec }),
);

test('property: a well-formed spec parses into exactly the options it spells', () => {
  fc.assert(fc.property(specArb, ({ text, expected }) => {
    assert.deepEqual(parseFilterSpec(text), expected);
  }), { numRuns: 1000 });
});

test('property: a key the filter does not know is refused, naming the keys it takes', () => {
  const known = new Set(['block', 'file', 'ops', 'sectors', 'nth', 'rate', 'seed', 'status', ...FILTER_OPS, 'iops', 'read-iops', 'write-iops', 'bps', 'read-bps', 'write-bps', 'burst']);
  fc.assert(fc.property(specArb, fc.stringMatching(/^[a-z][a-z0-9-]{0,10}$/), (spec, key) => {
    fc.pre(!known.has(key));
    const text = spec.text.includes(':') ? `${spec.text},${key}=1` : `${spec.text}:${key}=1`;
    const e = refusal(text);
    assert.equal(e.code, 'UNKNOWN_FILTER_KEY');
    assert.match(e.message, new RegExp(`^filter ${spec.expected.name}: unknown option "${key}"`));
  }), { numRuns: 500 });
});

test('refusals say what is wrong, in one line each', () => {
  const cases: [string, string, RegExp][] = [
    ['', 'BAD_FILTER_SPEC', /expected NAME/],
    ['Cow', 'BAD_FILTER_SPEC', /lowercase/],
    ['zip', 'UNKNOWN_FILTER', /^unknown filter "zip": the filters are cow, error, delay, throttle, stats$/],
    ['cow:', 'BAD_FILTER_SPEC', /expected KEY=VALUE, got ""/],
    ['cow:block', 'BAD_FILTER_SPEC', /expected KEY=VALUE, got "block"/],
    ['cow:block=4K,,file=x', 'BAD_FILTER_SPEC', /got ""/],
    ['cow:block=4K,block=8K', 'DUPLICATE_FILTER_KEY', /block is given twice/],
    ['cow:block=3K', 'BAD_FILTER_VALUE', /block must be a power of two from 512 to 16M, got "3K"/],
    ['cow:block=256', 'BAD_FILTER_VALUE', /at least 512/],
    ['cow:block=32M', 'BAD_FILTER_VALUE', /power of two/],
    ['cow:file=', 'BAD_FILTER_VALUE', /file must be a path/],
    ['error:ops=read+read', 'BAD_FILTER_VALUE', /ops must be items of read, write, flush, discard, zero joined by \+/],
    ['error:ops=trim', 'BAD_FILTER_VALUE', /got "trim"/],
    ['error:sectors=9-3', 'BAD_FILTER_VALUE', /sector ranges/],
    ['error:sectors=1-2,3', 'BAD_FILTER_SPEC', /expected KEY=VALUE, got "3"/],
    ['error:nth=0', 'BAD_FILTER_VALUE', /nth must be an integer from 1/],
    ['error:rate=1.5', 'BAD_FILTER_VALUE', /rate must be a fraction/],
    ['error:rate=101%', 'BAD_FILTER_VALUE', /rate must be a fraction/],
    ['error:status=eio', 'BAD_FILTER_VALUE', /status must be one of ioerr, unsupp/],
    ['error:seed=-1', 'BAD_FILTER_VALUE', /seed must be an integer from 0 to 4294967295/],
    ['delay:read=fast', 'BAD_FILTER_VALUE', /read must be a duration/],
    ['delay:read=1h', 'BAD_FILTER_VALUE', /got "1h"/],
    ['throttle', 'BAD_FILTER_VALUE', /set at least one limit/],
    ['throttle:iops=0', 'BAD_FILTER_VALUE', /iops must be a number above 0/],
    ['throttle:bps=1X', 'BAD_FILTER_VALUE', /bps must be a size/],
    ['throttle:burst=1', 'BAD_FILTER_VALUE', /set at least one limit/],
    ['stats:x=1', 'UNKNOWN_FILTER_KEY', /it takes no options/],
    ['delay:read=1\nrm -rf', 'BAD_FILTER_VALUE', /got "1\\nrm -rf"/],
  ];
  for (const [text, code, message] of cases) {
    const e = refusal(text);
    assert.equal(e.code, code, text);
    assert.match(e.message, message, text);
    assert.ok(!e.message.includes('\n'), text);
  }
});

test('values: sizes, durations, fractions and ranges in their forms', () => {
  const cow = parseFilterSpec('cow:block=1M,file=/tmp/a=b.img');
  assert.deepEqual(cow.options, { granularity: 1 << 20, file: '/tmp/a=b.img' });
  const delay = parseFilterSpec('delay:read=1.5s,write=250us,flush=7');
  assert.deepEqual(delay.options, { read: 1500, write: 0.25, flush: 7, discard: undefined, zero: undefined });
  const error = parseFilterSpec('error:rate=0.25,sectors=8+16-23');
  assert.equal(error.name === 'error' && error.options.rate, 0.25);
  assert.deepEqual(error.name === 'error' && error.options.sectors, [{ first: 8, last: 8 }, { first: 16, last: 23 }]);
  const throttle = parseFilterSpec('throttle:read-iops=2.5,burst=2s');
  assert.equal(throttle.name === 'throttle' && throttle.options.burst, 2);
});

test('applyFilters stacks in the order given, the first nearest the guest', () => {
  const base = new MemoryBackend({ size: 1 << 20 });
  const top = applyFilters(base, ['stats', 'error:rate=0', 'throttle:iops=100', 'cow'].map(parseFilterSpec));
  const stack = filtersOf(top);
  assert.deepEqual(stack.map((f) => f.constructor), [StatsFilter, ErrorFilter, ThrottleFilter, CowFilter]);
  assert.equal(stack[stack.length - 1].inner, base);
  assert.equal(applyFilters(base, []), base);
});

test('stats above error counts the injected errors; below, it never sees the operation', () => {
  const make = (order: string[]) => applyFilters(new MemoryBackend({ size: 1 << 20 }), order.map(parseFilterSpec));
  for (const [order, seen] of [[['stats', 'error:ops=read'], 1], [['error:ops=read', 'stats'], 0]] as const) {
    const top = make([...order]);
    assert.throws(() => top.read(0, [new Uint8Array(512)]), { code: 'IO_ERROR' });
    const stats = filtersOf(top).find((f) => f instanceof StatsFilter) as StatsFilter;
    assert.equal(stats.snapshot().read.errors, seen);
  }
});

test('cow:file= opens its overlay through the environment, and is refused without one', () => {
  const base = new MemoryBackend({ size: 1 << 20 });
  const spec = [parseFilterSpec('cow:file=/scratch/overlay.img')];
  assert.throws(() => applyFilters(base, spec), { code: 'FILTER_UNAVAILABLE' });
  const opened: [string, number][] = [];
  const top = applyFilters(base, spec, {
    openOverlayFile: (path, size) => {
      opened.push([path, size]);
      return new MemoryBackend({ size });
    },
  });
  assert.deepEqual(opened, [['/scratch/overlay.img', 1 << 20]]);
  top.write(0, [new Uint8Array(512).fill(1)]);
  const back = new Uint8Array(512);
  base.read(0, [back]);
  assert.deepEqual(back, new Uint8Array(512), 'the base is not written');
});

test('every filter has a line of help, and every name in it parses', () => {
  assert.deepEqual(Object.keys(FILTER_HELP), ['cow', 'error', 'delay', 'throttle', 'stats']);
  for (const [name, help] of Object.entries(FILTER_HELP)) {
    assert.ok(help.length > 0 && !help.includes('\n'));
    if (name !== 'throttle') assert.equal(parseFilterSpec(name).name, name);
  }
});

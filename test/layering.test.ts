// DESIGN.md's layering rule is enforced by lint: outside src/node/ and src/cli/ nothing
// imports Node.js or the native addon. This proves the rule fires (a rule that cannot
// fail would let the browser-safe layers drift).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ESLint } from 'eslint';

const probe = "import { readFileSync } from 'node:fs';\nimport { mmap } from '../node/native.js';\nexport const used = [readFileSync, mmap];\n";

async function restrictedImports(filePath: string): Promise<number> {
  const eslint = new ESLint();
  const [result] = await eslint.lintText(probe, { filePath });
  return result.messages.filter((m) => m.ruleId === 'no-restricted-imports').length;
}

test('node:* and the addon are refused in the browser-safe layers', async () => {
  for (const dir of ['spec', 'memory', 'virtqueue', 'blk', 'backends', 'transport']) {
    assert.equal(await restrictedImports(`src/${dir}/probe.ts`), 2, dir);
  }
});

test('src/node/ and src/cli/ may use them', async () => {
  assert.equal(await restrictedImports('src/node/probe.ts'), 0);
  assert.equal(await restrictedImports('src/cli/probe.ts'), 0);
});

test('src/testing/ may use node:test and node:assert, and nothing else of Node', async () => {
  const eslint = new ESLint();
  const kit = "import { test } from 'node:test';\nimport assert from 'node:assert/strict';\nimport plain from 'node:assert';\nexport const used = [test, assert, plain];\n";
  const [allowed] = await eslint.lintText(kit, { filePath: 'src/testing/probe.ts' });
  assert.equal(allowed.messages.filter((m) => m.ruleId === 'no-restricted-imports').length, 0);
  assert.equal(await restrictedImports('src/testing/probe.ts'), 2);
});

// DESIGN.md's layering rule is enforced by lint: outside src/node/ and src/cli/ nothing
// imports Node.js or the native addon. This proves the rule fires (a rule that cannot
// fail would let the browser-safe layers drift).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ESLint } from 'eslint';
import ts from 'typescript';

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

// The rule above is per file; what a browser bundle gets is the import graph of the
// core entry point (`vblk`), compiled. Walk it: only relative imports, none into node/ or cli/.
const here = dirname(fileURLToPath(import.meta.url));
const distSrc = resolve(here, '../src');
const repo = resolve(here, '../..');

function importsOf(file: string): string[] {
  const code = readFileSync(file, 'utf8');
  const found: string[] = [];
  for (const m of code.matchAll(/^\s*(?:import|export)\b[^'";]*?\bfrom\s*['"]([^'"]+)['"]/gm)) found.push(m[1]);
  for (const m of code.matchAll(/^\s*import\s*['"]([^'"]+)['"]/gm)) found.push(m[1]);
  for (const m of code.matchAll(/\bimport\s*\(\s*['"]([^'"]+)['"]\s*\)/g)) found.push(m[1]);
  return found;
}

test('the core entry point reaches no Node.js module, package or adapter through its imports', () => {
  const seen = new Set<string>();
  const outside: string[] = [];
  const walk = (file: string): void => {
    if (seen.has(file)) return;
    seen.add(file);
    for (const spec of importsOf(file)) {
      if (!spec.startsWith('.')) outside.push(`${relative(distSrc, file)} imports ${spec}`);
      else walk(resolve(dirname(file), spec));
    }
  };
  walk(join(distSrc, 'index.js'));
  assert.deepEqual(outside, []);
  const adapters = [...seen].map((f) => relative(distSrc, f)).filter((f) => /^(node|cli)\//.test(f));
  assert.deepEqual(adapters, []);
  assert.ok(seen.size > 20, `walked ${seen.size} modules: the import scan found the graph`);
});

test('the core and the loopback harness type-check with a browser\'s globals and no Node.js types', () => {
  const program = ts.createProgram([join(repo, 'src/index.ts'), join(repo, 'src/testing/loopback.ts')], {
    target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.NodeNext, moduleResolution: ts.ModuleResolutionKind.NodeNext,
    lib: ['lib.es2022.d.ts', 'lib.dom.d.ts'], types: [], strict: true, noEmit: true, skipLibCheck: true,
  });
  const errors = ts.getPreEmitDiagnostics(program).map((d) => ts.flattenDiagnosticMessageText(d.messageText, '\n'));
  assert.deepEqual(errors, []);
});

test('src/testing/ may use node:test and node:assert, and nothing else of Node', async () => {
  const eslint = new ESLint();
  const kit = "import { test } from 'node:test';\nimport assert from 'node:assert/strict';\nimport plain from 'node:assert';\nexport const used = [test, assert, plain];\n";
  const [allowed] = await eslint.lintText(kit, { filePath: 'src/testing/probe.ts' });
  assert.equal(allowed.messages.filter((m) => m.ruleId === 'no-restricted-imports').length, 0);
  assert.equal(await restrictedImports('src/testing/probe.ts'), 2);
});

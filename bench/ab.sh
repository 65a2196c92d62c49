#!/bin/bash
# Compares the loopback data path of git REF (A) with the working tree (B): builds both,
# then runs dist/bench/ab.js on them. Usage: bash bench/ab.sh REF [ab.js options]
set -euo pipefail
ref=${1:?usage: bash bench/ab.sh REF [--rounds N] [--backend memory|null]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$work/src" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$root" worktree add -q "$work/src" "$ref"
ln -s "$root/node_modules" "$work/src/node_modules"
# Both trees need the package root (package.json, the built addon) above their dist/.
for side in a b; do
  mkdir -p "$work/$side"
  cp "$root/package.json" "$work/$side/"
  ln -s "$root/build" "$work/$side/build"
done
# Each tree builds into its own dist/ (the examples and tests import the package by its
# name, which resolves through package.json's exports to dist/), then is copied aside.
(cd "$work/src" && npx tsc -p . && cp -r dist "$work/a/dist")
(cd "$root" && npx tsc -p . && cp -r dist "$work/b/dist")
node "$work/b/dist/bench/ab.js" "$work/a/dist" "$work/b/dist" "$@"

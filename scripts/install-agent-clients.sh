#!/usr/bin/env bash
# Installs the agent CLIs the client tests drive (tests/test_agent_clients.py): Claude Code and the Codex
# CLI, pinned, from the npm registry into ~/.cache/lmkube/agent-clients/<package>-<version>/ (keyed by
# version, so a repeat run is instant and a version bump installs beside the old one). Both packages carry
# their native binary in a per-platform npm package, so nothing outside the registry is fetched.
# Prints one line per client: name and the path of its executable.
set -euo pipefail

CLAUDE_CODE_VERSION=2.1.332
CODEX_VERSION=0.171.0
cache=${LMKUBE_CACHE:-$HOME/.cache/lmkube}/agent-clients

command -v npm >/dev/null || { echo "install-agent-clients: npm (Node.js) is needed" >&2; exit 1; }

install() {  # name package version bin
  local name=$1 package=$2 version=$3 bin=$4
  local dir="$cache/$name-$version"
  if [ ! -x "$dir/node_modules/.bin/$bin" ]; then
    echo "[install-agent-clients] npm install $package@$version ..." >&2
    rm -rf "$dir.tmp"
    mkdir -p "$dir.tmp"
    # --foreground-scripts: Claude Code's postinstall puts its native binary in place of a stub.
    npm install --prefix "$dir.tmp" --no-audit --no-fund --no-save --loglevel=error --foreground-scripts \
      "$package@$version" >&2
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
  fi
  "$dir/node_modules/.bin/$bin" --version >/dev/null  # a stub or a missing platform package fails here
  echo "$name $dir/node_modules/.bin/$bin"
}

install claude-code @anthropic-ai/claude-code "$CLAUDE_CODE_VERSION" claude
install codex @openai/codex "$CODEX_VERSION" codex

#!/usr/bin/env bash
# The benchmark: one command, one table. Installs what is missing (PostgreSQL, Redis, wrk, curl, the docker-compose
# validator; as root), builds in Release, starts PostgreSQL (fsync on) and Redis on free loopback ports, runs the demo
# API in the embedded and the durable shape, drives it with wrk and prints the table. Extra arguments go to the
# benchmark (--rounds N, --seconds S, --scale, --memory; --grain for the in-process grain benchmark alone, which needs
# none of the servers).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ " $* " == *" --grain "* ]] || scripts/install-servers.sh --with-wrk
source scripts/run-dir.sh
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1
# dotnet-gcdump measures the live heap (it induces a full collection) for --memory.
if [[ " $* " == *" --memory "* ]] && [ ! -x "$HOME/.dotnet/tools/dotnet-gcdump" ]; then
  dotnet tool install -g dotnet-gcdump >/dev/null
fi
dotnet build bench/OrleansIdempotency.Bench -c Release -warnaserror -nologo -v q
dotnet bench/OrleansIdempotency.Bench/bin/Release/net10.0/OrleansIdempotency.Bench.dll "$@"

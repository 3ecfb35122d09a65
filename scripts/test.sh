#!/usr/bin/env bash
# The test command: installs what is missing, then runs every test project in turn. The tests start their own
# PostgreSQL and Redis (and, for fault tests, silo and API processes) on free loopback ports and stop them; this
# script kills anything a crashed test process left behind.
#   scripts/test.sh            the whole suite
#   scripts/test.sh --quick    without the long fault-injection scenarios
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-servers.sh

source scripts/run-dir.sh
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1

filter=()
if [ "${1:-}" = "--quick" ]; then
  filter=(--filter "Category!=Long")
fi

docker-compose -f docker-compose.yml config -q
echo "docker-compose.yml: valid"

dotnet build OrleansIdempotency.sln -c Release -warnaserror -nologo -v q
status=0
log="$run_dir/test.log"
# One project at a time: the machine has two cores, and the fault tests measure time. A test that hangs is stopped
# after 8 minutes (the longest scenarios allow their workload 4 and their checks 1 beside it), naming itself, rather than holding the run.
for project in tests/*/*.Tests.csproj; do
  echo "== $project"
  dotnet test "$project" -c Release --no-build --nologo "${filter[@]}" --logger "console;verbosity=normal" \
    --blame-hang-timeout 8m --blame-hang-dump-type none 2>&1 | tee -a "$log" \
    || status=1
  # Before the next project, whose tests measure time on the two cores.
  kill_leftovers
done
if [ -s "$run_dir/fault-report.txt" ]; then
  echo "== fault-injection scenarios (counted by the checker)"
  cat "$run_dir/fault-report.txt"
fi
passed=$(awk '/^ +Passed: [0-9]+$/ { n += $2 } END { print n + 0 }' "$log")
failed=$(awk '/^ +Failed: [0-9]+$/ { n += $2 } END { print n + 0 }' "$log")
[ "$failed" -eq 0 ] || status=1
echo "tests: $passed passed, $failed failed"
exit $status

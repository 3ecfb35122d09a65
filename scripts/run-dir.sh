# Sourced by test.sh and bench.sh: a directory for the run, exported as IDEMPOTENCY_TEST_RUN_DIR, where the processes
# the run starts record their pids and data directories (tests/Testing's ChildProcesses); whatever is left there when
# the run ends, interrupted or not, is killed and removed. The benchmark's frozen (SIGSTOP) API processes included:
# SIGKILL ends a stopped process too.
run_dir=$(mktemp -d -t orleans-idempotency-run.XXXXXX)
# What a test process that died (a crash, a hang stopped by --blame-hang-timeout) left: its servers, each killed only
# if its pid still names the process started then (its start time, /proc/PID/stat's 22nd field, in the pid's file),
# and their data directories.
kill_leftovers() {
  if [ -d "$run_dir/pids" ]; then
    for pid_file in "$run_dir"/pids/*; do
      [ -e "$pid_file" ] || continue
      pid=$(basename "$pid_file")
      started=$(cat "$pid_file" 2>/dev/null) || continue
      if [ -n "$started" ] && [ -r "/proc/$pid/stat" ]; then
        stat=$(cat "/proc/$pid/stat" 2>/dev/null || true)
        fields=(${stat##*) })
        [ "${fields[19]:-}" = "$started" ] && kill -9 "$pid" 2>/dev/null || true
      fi
      rm -f "$pid_file"
    done
  fi
  if [ -f "$run_dir/directories" ]; then
    while IFS= read -r directory; do rm -rf -- "$directory" || true; done < "$run_dir/directories"
    rm -f "$run_dir/directories"
  fi
}
cleanup() {
  kill_leftovers
  rm -rf "$run_dir"
}
# Interrupted, the run stops (a trap that returns would go on to the next project).
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
export IDEMPOTENCY_TEST_RUN_DIR="$run_dir"

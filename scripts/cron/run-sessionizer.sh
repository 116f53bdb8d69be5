#!/usr/bin/env bash
# Runs one sessionizer command from cron and keeps its JSON summary.
#
#   run-sessionizer.sh sessionize|maintain [extra flags...]
#
# Summaries go to $SESSIONIZER_SUMMARY_DIR/<command>-<UTC time>.json (default
# /var/log/sessionizer), logs (JSON lines) to <command>.log in the same folder. Summaries older
# than $SESSIONIZER_KEEP_DAYS days (default 14) are deleted. Exit 75 (another run holds the
# lock) is normal under cron when a run overlaps the next tick: it is logged and exits 0 so cron
# does not mail about it. Any other non-zero exit is passed on, so cron's mail reports it.
set -u
cmd="${1:?usage: run-sessionizer.sh sessionize|maintain [flags...]}"
shift
bin="${SESSIONIZER_BIN:-sessionizer}"
dir="${SESSIONIZER_SUMMARY_DIR:-/var/log/sessionizer}"
keep="${SESSIONIZER_KEEP_DAYS:-14}"
mkdir -p "$dir"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
summary="$dir/$cmd-$stamp.json"

"$bin" "$cmd" --output json --log-format json "$@" >"$summary.tmp" 2>>"$dir/$cmd.log"
code=$?
case "$code" in
  0)
    mv "$summary.tmp" "$summary"
    ;;
  75)
    rm -f "$summary.tmp"
    echo "{\"time\":\"$stamp\",\"note\":\"skipped: another run holds the lock (exit 75)\"}" >>"$dir/$cmd.log"
    code=0
    ;;
  *)
    mv "$summary.tmp" "$summary.failed"
    echo "sessionizer $cmd failed with exit $code; see $dir/$cmd.log" >&2
    ;;
esac
find "$dir" -name "$cmd-*.json*" -mtime "+$keep" -delete 2>/dev/null
exit "$code"

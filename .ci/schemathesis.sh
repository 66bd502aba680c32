#!/usr/bin/env bash
# Schemathesis against a running cmz demo server: checks that the server does what
# cmz-tower/openapi.yaml says (statuses, bodies, headers, content types, auth, methods)
# for generated valid and invalid requests. Exits non-zero on any failure.
#
#   CMZ_DEMO_URL=http://127.0.0.1:8123 bash .ci/schemathesis.sh
#
# The server must already be running with the development users (the demo's default) and,
# so that turns are not cut off by the 50-per-hour limit, CMZ_TURN_RATE_LIMIT=100000
# (a 429 is documented, so a lower limit only costs coverage). The run fuzzes POST /auth,
# which trips the failed-login limit for this client address for 15 minutes: log in
# elsewhere before, not after. POST /auth/logout is tested last, with its own token.
#
# Optional: CMZ_SCHEMATHESIS_EMAIL / CMZ_SCHEMATHESIS_PASSWORD (default the dev admin),
# CMZ_SCHEMATHESIS_EXAMPLES (examples per operation, default 300),
# CMZ_SCHEMATHESIS_SEED (default 20261125; fixed so CI runs are reproducible),
# CMZ_SCHEMATHESIS_REPORT_DIR (JUnit and HAR reports, default target/schemathesis).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${CMZ_DEMO_URL:?set CMZ_DEMO_URL to the running demo server, for example http://127.0.0.1:8123}"
base_url=${CMZ_DEMO_URL%/}
email=${CMZ_SCHEMATHESIS_EMAIL:-admin@cmz.org}
password=${CMZ_SCHEMATHESIS_PASSWORD:-admin123}
examples=${CMZ_SCHEMATHESIS_EXAMPLES:-300}
seed=${CMZ_SCHEMATHESIS_SEED:-20261125}
report_dir=${CMZ_SCHEMATHESIS_REPORT_DIR:-target/schemathesis}
spec=cmz-tower/openapi.yaml
config=.ci/schemathesis.toml

# The spec relies on this version's reading of event-stream schemas (one schema per event).
version=4.32.5
if ! schemathesis --version 2> /dev/null | grep -qx "schemathesis, version ${version}"; then
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        "schemathesis==${version}"
fi

# An access token for the account: waits up to 30 s for the server to answer.
login() {
    python3 - "$base_url" "$email" "$password" << 'PY'
import json, sys, time, urllib.error, urllib.request

url, email, password = sys.argv[1] + "/auth", sys.argv[2], sys.argv[3]
body = json.dumps({"email": email, "password": password}).encode()
deadline = time.monotonic() + 30
while True:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            print(json.load(response)["token"])
            sys.exit(0)
    except urllib.error.HTTPError as error:
        sys.exit(f"login as {email} at {url} failed: HTTP {error.code} {error.read().decode(errors='replace')}")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        if time.monotonic() > deadline:
            sys.exit(f"login at {url} failed: {error}")
        time.sleep(0.5)
PY
}
token=$(login)
logout_token=$(login)

mkdir -p "$report_dir"
run() {
    local limit=$1 name=$2
    shift 2
    local status=0
    timeout --kill-after=10 "$limit" schemathesis --config-file "$config" run "$spec" \
        --url "$base_url" --checks all --seed "$seed" --generation-database none --no-color \
        --report junit,har --report-dir "$report_dir" \
        --report-junit-path "$report_dir/$name.xml" --report-har-path "$report_dir/$name.har" \
        "$@" || status=$?
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        echo "schemathesis ($name) ran out of its ${limit}s" >&2
    fi
    return "$status"
}

status=0
# Everything but logout, which would revoke the token. About 150 s on a busy 2-core
# machine for 17 operations (fuzzing about 100 s, the stateful phase about 40 s).
run 200 main -H "Authorization: Bearer ${token}" --exclude-path /auth/logout \
    --max-examples "$examples" || status=$?
# Logout last, with a token of its own.
run 20 logout -H "Authorization: Bearer ${logout_token}" --include-path /auth/logout \
    --phases examples,coverage,fuzzing --max-examples 20 || status=$?
exit "$status"

#!/usr/bin/env bash
# Look at the demo's report.html as a person would: headless Chromium renders it to a PNG.
#   scripts/screenshot_report.sh [demo-out/report.html] [demo-out/report.png]
# Needs Debian's chromium (apt-get install chromium). The flags keep Chromium off the network.
set -euo pipefail
page=$(realpath "${1:-demo-out/report.html}")
shot=${2:-$(dirname "$page")/report.png}
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
    --window-size=1200,2600 --screenshot="$shot" "file://$page" >/dev/null 2>&1
echo "wrote $shot"

#!/usr/bin/env bash
# Debian's chromium for tests/test_report_html.py, which drives it headless over --remote-debugging-pipe
# (no WebDriver needed). CI runs as root; a machine that already has it skips the download.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

#!/usr/bin/env bash
# Idempotent setup: a virtual environment in the checkout with the pinned packages, plus the Debian
# packages the project uses (real garment images, the ffmpeg CLI for stream tests, mosquitto for the MQTT tests,
# headless chromium for the live-view test) where apt exists.
# A stamp file holds the hash of the pins, so a second run costs a few milliseconds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.ladon-stamp"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"

need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
command -v ffmpeg >/dev/null 2>&1 || need_apt+=(ffmpeg)
{ command -v mosquitto || [ -x /usr/sbin/mosquitto ]; } >/dev/null 2>&1 || need_apt+=(mosquitto)  # MQTT sink tests
{ command -v chromium || command -v chromium-browser; } >/dev/null 2>&1 || need_apt+=(chromium)  # live-view test
if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[bootstrap] apt-get install ${need_apt[*]}" >&2
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null 2>&1 \
      || echo "[bootstrap] warning: could not install ${need_apt[*]}; the generator falls back to drawn parts" >&2
  else
    echo "[bootstrap] warning: ${need_apt[*]} missing and apt-get unavailable (not root?)" >&2
  fi
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
echo "[bootstrap] creating $VENV and installing pinned packages (first run only, a few minutes)" >&2
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt"
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
echo "$WANT" > "$STAMP"

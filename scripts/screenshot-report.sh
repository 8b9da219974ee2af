#!/usr/bin/env bash
# Screenshots a report.html with headless Chromium (Debian: apt-get install chromium).
#
#   scripts/screenshot-report.sh REPORT.html [OUT.png] [WIDTH]
#
# Measures the page, then writes OUT.png (default: REPORT.png beside the page), the whole page at WIDTH
# (default 1280) pixels wide, and OUT-1.png, OUT-2.png, ... the page cut into screens of WIDTH × 1000 for
# reading at full size. Prints each file written.
set -euo pipefail
page=${1:?usage: $0 REPORT.html [OUT.png] [WIDTH]}
[ -f "$page" ] || { echo "error: $page: no such file" >&2; exit 1; }
out=${2:-${page%.html}.png}
width=${3:-1280}
tile=1000
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "error: no chromium found (apt-get install chromium)" >&2; exit 1; }
url="file://$(realpath "$page")"
mkdir -p "$(dirname "$out")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
run() { timeout 120 "$browser" --headless=new --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$work/profile" "$@" 2>/dev/null; }

# 1. The page's height: a wrapper page loads it in a frame and writes the height into its own DOM.
cat >"$work/measure.html" <<HTML
<!DOCTYPE html><html><body><iframe id="f" src="$url" style="width:${width}px;height:500px;border:0"></iframe>
<script>document.getElementById("f").onload = function () {
  document.body.setAttribute("data-height", this.contentDocument.documentElement.scrollHeight); };</script></body></html>
HTML
height=$(run --allow-file-access-from-files --virtual-time-budget=5000 --dump-dom "file://$work/measure.html" |
    grep -o 'data-height="[0-9]*"' | grep -o '[0-9][0-9]*' || true)
[ -n "$height" ] || { echo "warning: could not measure $page; assuming 8000 px" >&2; height=8000; }

# 2. The whole page, then screens cut out of it by shifting the page up inside a frame.
shot() { # shot URL FILE HEIGHT
    rm -f "$2"
    run --window-size="$width,$3" --screenshot="$(realpath -m "$2")" "$1" >/dev/null || true
    [ -s "$2" ] || { echo "error: chromium wrote no screenshot to $2" >&2; exit 1; }
    echo "$2"
}
shot "$url" "$out" "$height"
n=0
for ((top = 0; top < height; top += tile)); do
    n=$((n + 1))
    cat >"$work/tile.html" <<HTML
<!DOCTYPE html><html><body style="margin:0;overflow:hidden"><iframe src="$url" scrolling="no"
style="position:absolute;left:0;top:-${top}px;width:${width}px;height:${height}px;border:0"></iframe></body></html>
HTML
    shot "file://$work/tile.html" "${out%.png}-$n.png" "$tile"
done

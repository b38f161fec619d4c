"""Build an HTML template for `dvc plots show` with vega, vega-lite and vega-embed inlined.

DVC's default page loads them from a CDN and renders blank without a network. This fetches
the same versions from the npm registry once (`npm pack`) into .cache/ and writes
.cache/dvc-plots-offline.html; `make plots` passes it to `dvc plots show --html-template`.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The versions dvc-render's own page asks the CDN for.
PACKAGES = {
    "vega@5.20.2": "package/build/vega.min.js",
    "vega-lite@5.2.0": "package/build/vega-lite.min.js",
    "vega-embed@6.18.2": "package/build/vega-embed.min.js",
}
OUT = Path(".cache/dvc-plots-offline.html")

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    <title>DVC plots (offline)</title>
{inline}
    <style>table {{ border-spacing: 15px; }}</style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def main() -> int:
    scripts = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec, member in PACKAGES.items():
            try:
                out = subprocess.run(["npm", "pack", spec, "--silent"], cwd=tmp, check=True,
                                     capture_output=True, text=True).stdout.split()[-1]
            except (OSError, subprocess.CalledProcessError) as exc:
                print(f"cannot fetch {spec} with npm ({exc}); `dvc plots show` still writes "
                      "the PNG plots, and its vega charts need a network.", file=sys.stderr)
                return 1
            with tarfile.open(Path(tmp) / out) as tar:
                js = tar.extractfile(member).read().decode("utf-8")
            js = js.replace("</script", "<\\/script")  # keep the inline block closed
            scripts.append(f"    <script>{js}</script>")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(PAGE.format(inline="\n".join(scripts)), encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Fetches the NEON airborne tree-crown images that the DeepForest 2.1.0 wheel (MIT licence,
# Weinstein et al.) ships in deepforest/data/, with `pip download --no-deps` from PyPI into a
# cache, and lays them out as Pascal VOC folders (the .xml annotations beside their images):
#
#   $ROOT/train  2019_YELL_2_541000_4977000_image_crop (1249x1035, 279 trees) and
#                2019_YELL_2_528000_4978000_image_crop2 (2299x2472, 574 trees)
#   $ROOT/val    OSBS_029 (400x400, 61 trees; its .xml names a .tif, the .png is used)
#   $ROOT/soap   SOAP_061 (400x400, 37 boxes of two classes, Alive / Dead)
#
# ROOT is $TREES_DIR, else $HOME/.cache/candle-detloss/deepforest/trees. Nothing is fetched
# when the checked wheel is already cached. Prints ROOT on its last line. Fails loudly.
set -euo pipefail

version=2.1.0
sha256=8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54
cache="${DEEPFOREST_CACHE:-$HOME/.cache/candle-detloss/deepforest}"
root="${TREES_DIR:-$cache/trees}"
wheel="$cache/deepforest-$version-py3-none-any.whl"
python="${PYTHON:-python3}"

mkdir -p "$cache"
if [ ! -f "$wheel" ]; then
  echo "trees: downloading deepforest==$version from PyPI (about 21 MB) into $cache" >&2
  "$python" -m pip download --quiet --disable-pip-version-check --no-deps \
    "deepforest==$version" -d "$cache"
fi
have="$(sha256sum "$wheel" | cut -d' ' -f1)"
if [ "$have" != "$sha256" ]; then
  echo "trees: $wheel has sha256 $have, expected $sha256" >&2
  exit 1
fi

# Extract only the files we use (Python's zipfile: no unzip needed on a bare machine).
"$python" - "$wheel" "$root" <<'PY'
import os, shutil, sys, zipfile

wheel, root = sys.argv[1], sys.argv[2]
layout = {
    "train": ["2019_YELL_2_541000_4977000_image_crop", "2019_YELL_2_528000_4978000_image_crop2"],
    "val": ["OSBS_029"],
    "soap": ["SOAP_061"],
}
with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    for split, stems in layout.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for stem in stems:
            for ext in (".xml", ".png"):
                src = f"deepforest/data/{stem}{ext}"
                if src not in names:
                    sys.exit(f"trees: {src} is not in {wheel}")
                dst = os.path.join(root, split, stem + ext)
                info = z.getinfo(src)
                if os.path.exists(dst) and os.path.getsize(dst) == info.file_size:
                    continue
                with z.open(src) as fi, open(dst + ".part", "wb") as fo:
                    shutil.copyfileobj(fi, fo)
                os.replace(dst + ".part", dst)
    lic = "deepforest-2.1.0.dist-info/licenses/LICENSE"
    with z.open(lic) as fi, open(os.path.join(root, "LICENSE-deepforest"), "wb") as fo:
        shutil.copyfileobj(fi, fo)
for split in layout:
    files = sorted(os.listdir(os.path.join(root, split)))
    print(f"trees: {split}: {' '.join(files)}", file=sys.stderr)
PY
echo "$root"

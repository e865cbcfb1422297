"""Zip a layer's ``python/`` directory reproducibly, enforce Lambda's size limits, write publish metadata.

Used by layer.zip.sh. Entries are sorted and carry a fixed timestamp, so the
same inputs give the same zip. The metadata file is a valid
``aws lambda publish-layer-version --cli-input-json`` document; pass the zip
with ``--zip-file fileb://<zip>``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile

MB = 1024 * 1024
#: 1980-01-01, the earliest time a zip entry can hold: reproducible archives.
FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def layer_files(python_dir: str) -> list[str]:
    """Every file under ``python_dir``, sorted, as paths relative to its parent."""
    parent = os.path.dirname(os.path.abspath(python_dir))
    found = []
    for dirpath, dirnames, filenames in os.walk(python_dir):
        dirnames.sort()
        for filename in filenames:
            found.append(os.path.relpath(os.path.join(dirpath, filename), parent))
    return sorted(found)


def write_zip(python_dir: str, zip_path: str) -> tuple[int, int]:
    """Write the zip; return (zipped bytes, unzipped bytes)."""
    parent = os.path.dirname(os.path.abspath(python_dir))
    unzipped = 0
    tmp_path = zip_path + ".partial"
    with zipfile.ZipFile(tmp_path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for rel in layer_files(python_dir):
            full = os.path.join(parent, rel)
            info = zipfile.ZipInfo(rel, FIXED_TIME)
            info.external_attr = (os.stat(full).st_mode & 0o777 | 0o100000) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(full, "rb") as f:
                payload = f.read()
            unzipped += len(payload)
            archive.writestr(info, payload, compresslevel=9)
    os.replace(tmp_path, zip_path)
    return os.path.getsize(zip_path), unzipped


def publish_metadata(name: str, description: str, runtime: str, arch: str) -> dict:
    """The publish-layer-version input (Description is limited to 256 characters)."""
    return {
        "LayerName": name,
        "Description": description[:256],
        "CompatibleRuntimes": [runtime],
        "CompatibleArchitectures": [arch],
        "LicenseInfo": "Apache-2.0",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("python_dir")
    parser.add_argument("zip_path")
    parser.add_argument("--max-zipped-mb", type=float, required=True)
    parser.add_argument("--max-unzipped-mb", type=float, required=True)
    parser.add_argument("--metadata", required=True, help="where to write the publish JSON")
    parser.add_argument("--runtime", required=True, help="e.g. python3.13")
    parser.add_argument("--arch", required=True, choices=["x86_64", "arm64"])
    parser.add_argument("--description", default="FSD-Inference layer")
    args = parser.parse_args(argv)
    if os.path.basename(os.path.normpath(args.python_dir)) != "python":
        parser.error("the layer root must be a directory named python/ (Lambda's layout)")
    zipped, unzipped = write_zip(args.python_dir, args.zip_path)
    print(f"{args.zip_path}: {zipped / MB:.1f} MB zipped, {unzipped / MB:.1f} MB unzipped")
    problems = []
    if zipped > args.max_zipped_mb * MB:
        problems.append(f"zipped {zipped / MB:.1f} MB > {args.max_zipped_mb} MB")
    if unzipped > args.max_unzipped_mb * MB:
        problems.append(f"unzipped {unzipped / MB:.1f} MB > {args.max_unzipped_mb} MB")
    if problems:
        os.remove(args.zip_path)
        print(f"zip_layer: error: layer too large: {'; '.join(problems)}", file=sys.stderr)
        return 1
    name = os.path.splitext(os.path.basename(args.zip_path))[0].replace(".", "")
    with open(args.metadata, "w") as f:
        json.dump(publish_metadata(name, args.description, args.runtime, args.arch), f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rebuild the embedded default dataset from the official Graph Challenge files.

Usage: python scripts/make_embedded_data.py NETWORK_DIR_OR_TAR INPUTS CATEGORIES [N_IMAGES [OUT]]
(NETWORK may be the official neuron1024.tar.gz; it is unpacked to a temporary folder. OUT defaults
to the package's embedded file; give another path to check a rebuild against the shipped copy.)
"""
import os
import sys
import tarfile
import tempfile

from fsd_runtime import model


def main(argv):
    network, inputs, categories = argv[:3]
    n_images = int(argv[3]) if len(argv) > 3 else 10000
    with tempfile.TemporaryDirectory() as tmp:
        if network.endswith(".tar.gz"):
            with tarfile.open(network) as tar:
                tar.extractall(tmp, filter="data")
            network = os.path.join(tmp, os.listdir(tmp)[0])
        ds = model.load_dataset(network, inputs, categories)
    images = ds.images.rows(0, n_images)
    gold = ds.categories[ds.categories < n_images]
    out = argv[4] if len(argv) > 4 else os.path.join(os.path.dirname(model.__file__), "data",
                                                     model.EMBEDDED_FILE)
    model.write_embedded(model.Dataset(ds.name, ds.network, images, gold), out)
    print(f"wrote {out}: {os.path.getsize(out)} bytes, {images.shape[0]} images, {gold.size} categories")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Embed RGB uint8 images with one Keras backend in a fresh process (tests/test_backends.py).

    python tests/backend_worker.py BACKEND WEIGHTS INPUT.npy OUTPUT.npy [PRECISION] [COMPILE]

Keras' backend is fixed per process, so each backend is checked in its own interpreter. Writes the
float32 logits, and prints one JSON line with what the process saw.
"""
import json
import sys

import numpy as np


def main(argv):
    backend, weights, inputs, output = argv[:4]
    precision = argv[4] if len(argv) > 4 else "float32"
    compile_mode = argv[5] if len(argv) > 5 else "auto"
    from imagebeam.transforms.model.embedding_backends import embedder

    model = embedder(weights, precision, backend, compile_mode)
    rgb = np.load(inputs, allow_pickle=False)
    logits = model(rgb)
    np.save(output, logits)
    import keras

    print(json.dumps({"backend": keras.backend.backend(), "compiled": model.compiled,
                      "tensorflow_loaded": "tensorflow" in sys.modules, "shape": list(logits.shape)}))


if __name__ == "__main__":
    main(sys.argv[1:])

"""A LoRA layer over data larger than memory: memory-mapped in, memory-mapped out, a block at a time.

The inputs are a float64 ``.npy`` file opened with ``np.load(mmap_mode="r")``; the layer is float32,
so each block is cast on the way in (nplora's dtype rule). Outputs go straight into a memory-mapped
``.npy`` file through ``out=``, so no batch-sized result is ever allocated. Peak memory stays near
one block whatever the file sizes.

    python examples/mmap_pipeline.py --rows 100000 --dir /tmp/nplora-pipeline
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

import nplora


def make_inputs(path: Path, rows: int, features: int, seed: int = 0) -> None:
    """Write a float64 ``(rows, features)`` array to `path` without holding it all in memory."""
    rng = np.random.default_rng(seed)
    inputs = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(rows, features))
    for start in range(0, rows, 4096):
        stop = min(start + 4096, rows)
        inputs[start:stop] = rng.standard_normal((stop - start, features))
    inputs.flush()
    del inputs


def run_pipeline(inputs_path: Path, outputs_path: Path, layer: nplora.LoraLinear,
                 block_rows: int = 4096) -> np.memmap:
    """Apply `layer` to every row of the ``.npy`` file `inputs_path`, into `outputs_path`.

    Parameters
    ----------
    inputs_path : Path
        A ``.npy`` file of shape (rows, layer.in_features), any real dtype.
    outputs_path : Path
        The ``.npy`` file to create, shape (rows, layer.out_features), of the layer's dtype.
    layer : LoraLinear
        The layer to apply (in eval mode: nothing is kept for a backward pass).
    block_rows : int
        Rows per call.

    Returns
    -------
    numpy.memmap, shape (rows, layer.out_features)
        The outputs, memory-mapped.
    """
    inputs = np.load(inputs_path, mmap_mode="r")
    outputs = np.lib.format.open_memmap(outputs_path, mode="w+", dtype=layer.dtype,
                                        shape=(inputs.shape[0], layer.out_features))
    layer.eval()
    for start in range(0, inputs.shape[0], block_rows):
        stop = min(start + block_rows, inputs.shape[0])
        layer(inputs[start:stop], out=outputs[start:stop])  # a C-contiguous slice of the file
    outputs.flush()
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--out-features", type=int, default=128)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args(argv)

    folder = args.dir or Path(tempfile.mkdtemp(prefix="nplora-pipeline-"))
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((args.out_features, args.features)) / np.sqrt(args.features))
    layer = nplora.LoraLinear(weight.astype(np.float32), r=8, lora_alpha=16, init_lora_weights=False,
                              seed=0)
    make_inputs(folder / "inputs.npy", args.rows, args.features)
    outputs = run_pipeline(folder / "inputs.npy", folder / "outputs.npy", layer)

    check = layer(np.load(folder / "inputs.npy", mmap_mode="r")[:5])  # a plain ndarray
    np.testing.assert_allclose(outputs[:5], check, rtol=1e-6, atol=1e-6)
    print(f"{args.rows} rows, float64 {args.features} -> float32 {args.out_features}, "
          f"written to {folder / 'outputs.npy'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The `magika` demo model: Google's file-type detector, the ONNX model shipped
inside the installed `magika` wheel (never downloaded), with its sample corpus
(64 files of the Python installation, magika's package and standard-library
encoders), magika's feature extraction, and reference outputs from ONNX Runtime
fp32 on the model.

Imports no grpc, no generated protobuf and nothing from the gateway.
"""

from __future__ import annotations

import argparse
import base64
import bz2
import configparser
import csv
import difflib
import email.message
import functools
import gzip
import io
import json
import lzma
import pickle
import sqlite3
import struct
import sys
import tarfile
import wave
import zipfile
import zlib
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import numpy.typing as npt

from backends.demo.common import SAMPLES, save_samples
from backends.runtimes.ort import OrtAdapter

# The model that magika==1.0.3 ships (and uses by default) inside its package.
MAGIKA_MODEL = "standard_v3_3"


def magika_folder() -> Traversable:
    """The folder of magika's model inside the installed `magika` package."""
    folder = files("magika") / "models" / MAGIKA_MODEL
    if not (folder / "model.onnx").is_file():
        raise FileNotFoundError(
            f"the installed magika package has no models/{MAGIKA_MODEL}/model.onnx"
        )
    return folder


def magika_config() -> dict[str, Any]:
    """magika's model configuration: feature sizes, padding token, labels by output index."""
    config: dict[str, Any] = json.loads((magika_folder() / "config.min.json").read_text())
    return config


def magika_features(content: bytes, config: dict[str, Any]) -> list[int]:
    """magika's input features of one file (its extraction v2, as `Magika` does it):
    the first `beg_size` bytes after leading whitespace and the last `end_size`
    bytes before trailing whitespace, within one block at each end, padded."""
    if config["mid_size"] or config["use_inputs_at_offsets"]:
        raise ValueError("this magika model wants features this extraction does not make")
    block, padding = config["block_size"], config["padding_token"]
    beg_size, end_size = config["beg_size"], config["end_size"]
    beg = list(content[:block].lstrip()[:beg_size])
    end = list(content[-block:].rstrip()[-end_size:])
    return beg + [padding] * (beg_size - len(beg)) + [padding] * (end_size - len(end)) + end


def _png(image: npt.NDArray[np.uint8]) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    height, width, _ = image.shape
    rows = b"".join(b"\x00" + row.tobytes() for row in image)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _bmp(image: npt.NDArray[np.uint8]) -> bytes:
    height, width, _ = image.shape
    stride = (width * 3 + 3) // 4 * 4
    rows = b"".join(row[:, ::-1].tobytes().ljust(stride, b"\x00") for row in image[::-1])
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(rows), 2835, 2835, 0, 0)
    return (
        b"BM" + struct.pack("<IHHI", 14 + len(info) + len(rows), 0, 0, 14 + len(info)) + info + rows
    )


def _wav(rng: np.random.Generator) -> bytes:
    t = np.arange(8000) / 8000
    signal = np.sin(2 * np.pi * 440 * t) * 0.5 + rng.normal(0, 0.05, t.shape)
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes((signal * 32767).astype("<i2").tobytes())
    return out.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), data)
    return out.getvalue()


def _tar(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _sqlite(rows: list[tuple[int, str]]) -> bytes:
    connection = sqlite3.connect(":memory:")
    try:
        connection.execute("CREATE TABLE modules (id INTEGER PRIMARY KEY, name TEXT)")
        connection.executemany("INSERT INTO modules VALUES (?, ?)", rows)
        connection.commit()
        return connection.serialize()
    finally:
        connection.close()


def _pyc(source: bytes) -> bytes:
    import importlib.util
    import marshal

    code = compile(source, "module.py", "exec")
    return importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(code)


def _module_file(module: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"module {module} has no file")
    return Path(spec.origin)


def magika_corpus() -> dict[str, bytes]:
    """SAMPLES (64) files for magika: real files of the Python installation and magika's
    package, and files written by standard-library encoders, all deterministic."""
    import pydoc

    stdlib = Path(argparse.__file__).parent
    venv_scripts = stdlib / "venv" / "scripts"
    real = {
        "argparse.py": Path(argparse.__file__),
        "json/__init__.py": Path(json.__file__),
        "csv.py": Path(csv.__file__),
        "venv/activate": venv_scripts / "common" / "activate",
        "venv/Activate.ps1": venv_scripts / "common" / "Activate.ps1",
        "venv/activate.fish": venv_scripts / "posix" / "activate.fish",
        "venv/activate.csh": venv_scripts / "posix" / "activate.csh",
        "python": Path(sys.executable).resolve(),
        "numpy/_multiarray_umath": _module_file("numpy._core._multiarray_umath"),
    }
    corpus = {name: path.read_bytes() for name, path in real.items()}
    magika = magika_folder()
    for name in ("model.onnx", "README.md", "config.min.json"):
        corpus[f"magika/{name}"] = (magika / name).read_bytes()

    rng = np.random.default_rng(53)
    source = corpus["argparse.py"]
    gradient = np.linspace(0, 255, 48, dtype=np.uint8)
    image = np.stack(
        np.broadcast_arrays(gradient[:, None], gradient[None, :], np.uint8(128)), axis=-1
    )
    rows = [(i, name) for i, name in enumerate(sorted(sys.stdlib_module_names)[:200])]
    table = io.StringIO()
    csv.writer(table).writerows([("id", "name", "length"), *((i, n, len(n)) for i, n in rows)])
    ini = configparser.ConfigParser()
    ini["server"] = {"listen": "127.0.0.1:8001", "threads": "2", "model": "resnet"}
    ini["metrics"] = {"listen": "127.0.0.1:8002", "path": "/metrics"}
    ini_text = io.StringIO()
    ini.write(ini_text)
    message = email.message.EmailMessage()
    message["Received"] = (
        "from gateway.example.org (gateway.example.org [192.0.2.1]) by mx.example.org"
        " with ESMTPS id 4F2A; Mon, 1 Jan 2024 00:00:00 +0000"
    )
    message["Date"] = "Mon, 01 Jan 2024 00:00:00 +0000"
    message["Message-ID"] = "<drain-1@switchyard.example.org>"
    message["From"] = "Switchyard Router <router@example.org>"
    message["To"] = "SRE <sre@example.org>"
    message["Subject"] = "Backend big-cpu drained"
    message.set_content("The router moved traffic for resnet to small-cpu.\n" * 20)
    tree = ElementTree.Element("modules")
    for i, name in rows:
        ElementTree.SubElement(tree, "module", id=str(i)).text = name
    array = rng.standard_normal((64, 64)).astype(np.float32)
    npy, npz = io.BytesIO(), io.BytesIO()
    np.save(npy, array)
    np.savez_compressed(npz, weights=array, bias=array[0])
    old_lines = source.decode().splitlines(keepends=True)[:400]
    new_lines = [line.replace("parser", "reader") for line in old_lines]
    generated = {
        "argparse.py.gz": gzip.compress(source, mtime=0),
        "argparse.py.bz2": bz2.compress(source),
        "argparse.py.xz": lzma.compress(source),
        "stdlib.zip": _zip({"argparse.py": source, "csv.py": corpus["csv.py"]}),
        "stdlib.tar": _tar({"argparse.py": source, "csv.py": corpus["csv.py"]}),
        "modules.json": json.dumps({"modules": dict(rows)}, indent=2).encode(),
        "modules.csv": table.getvalue().encode(),
        "modules.xml": ElementTree.tostring(tree, xml_declaration=True, encoding="utf-8"),
        "json.html": pydoc.html.page("json", pydoc.html.document(json)).encode(),
        "modules.pickle": pickle.dumps({"modules": rows}, protocol=4),
        "argparse.pyc": _pyc(source),
        "modules.sqlite": _sqlite(rows),
        "weights.npy": npy.getvalue(),
        "weights.npz": npz.getvalue(),
        "gradient.png": _png(image),
        "gradient.bmp": _bmp(image),
        "tone.wav": _wav(rng),
        "message.eml": message.as_bytes(),
        "fleet.ini": ini_text.getvalue().encode(),
        "argparse.diff": "".join(
            difflib.unified_diff(old_lines, new_lines, "a/argparse.py", "b/argparse.py")
        ).encode(),
    }
    corpus.update(generated)
    corpus.update(_more_files(corpus, rows, stdlib))
    assert len(corpus) == SAMPLES, len(corpus)
    return corpus


def _more_files(
    corpus: dict[str, bytes], rows: list[tuple[int, str]], stdlib: Path
) -> dict[str, bytes]:
    """32 more files of the same kinds, from other sources: more modules, extension
    modules, archives, documents, data and media files."""
    import pydoc

    real = {
        "LICENSE.txt": stdlib / "LICENSE.txt",
        "functools.py": _module_file("functools"),
        "dataclasses.py": _module_file("dataclasses"),
        "_csv.so": _module_file("_csv"),
        "_decimal.so": _module_file("_decimal"),
        "_ctypes.so": _module_file("_ctypes"),
    }
    out = {name: path.read_bytes() for name, path in real.items()}
    rng = np.random.default_rng(59)
    source = corpus["csv.py"]
    other = out["functools.py"]
    noise = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    checker = ((np.indices((40, 40)).sum(axis=0) // 5) % 2 * 255).astype(np.uint8)
    image = np.stack([checker, noise[..., 1], 255 - checker], axis=-1)
    words = [name for _, name in rows[:120]]
    table = io.StringIO()
    csv.writer(table, delimiter=";").writerows(
        [("word", "upper"), *((w, w.upper()) for w in words)]
    )
    tree = ElementTree.Element("words")
    for word in words:
        ElementTree.SubElement(tree, "word", length=str(len(word))).text = word
    message = email.message.EmailMessage()
    message["Received"] = (
        "from router.example.org (router.example.org [192.0.2.7]) by mx.example.org"
        " with ESMTPS id 7C1B; Tue, 2 Jan 2024 09:30:00 +0000"
    )
    message["Date"] = "Tue, 02 Jan 2024 09:30:00 +0000"
    message["Message-ID"] = "<price-7@switchyard.example.org>"
    message["From"] = "Switchyard Prices <prices@example.org>"
    message["To"] = "SRE <sre@example.org>"
    message["Subject"] = "Price of small-cpu changed"
    message.set_content("small-cpu now costs 0.05 USD per hour; routes were re-ranked.\n" * 15)
    ini = configparser.ConfigParser()
    ini["worker"] = {"repository": "models", "threads": "1", "hardware_class": "cpu-x86-64-v3"}
    ini["batching"] = {"max_batch_rows": "16", "max_delay_ms": "2"}
    ini_text = io.StringIO()
    ini.write(ini_text)
    array = rng.standard_normal((48, 48)).astype(np.float64)
    npy, npz = io.BytesIO(), io.BytesIO()
    np.save(npy, array)
    np.savez_compressed(npz, scale=array, shift=array[:, 0])
    old_lines = source.decode().splitlines(keepends=True)[:300]
    new_lines = [line.replace("reader", "parser") for line in old_lines]
    shell = "#!/bin/sh\nset -eu\n" + "".join(
        f'echo "building {w}"\nmkdir -p "build/{w}"\n' for w in words[:60]
    )
    markdown = "# Modules\n\n" + "".join(
        f"## {w}\n\nThe `{w}` module, {len(w)} letters long.\n\n" for w in words[:60]
    )
    out |= {
        "csv.py.gz": gzip.compress(source, mtime=0),
        "functools.py.bz2": bz2.compress(other),
        "functools.py.xz": lzma.compress(other),
        "more.zip": _zip({"functools.py": other, "LICENSE.txt": out["LICENSE.txt"]}),
        "more.tar": _tar({"functools.py": other, "dataclasses.py": out["dataclasses.py"]}),
        "words.json": json.dumps([{"word": w, "length": len(w)} for w in words]).encode(),
        "words.csv": table.getvalue().encode(),
        "words.xml": ElementTree.tostring(tree, xml_declaration=True, encoding="utf-8"),
        "csv.html": pydoc.html.page("csv", pydoc.html.document(csv)).encode(),
        "words.pickle": pickle.dumps({"words": words}, protocol=5),
        "functools.pyc": _pyc(other),
        "words.sqlite": _sqlite(rows[:120]),
        "scale.npy": npy.getvalue(),
        "scale.npz": npz.getvalue(),
        "checker.png": _png(image),
        "checker.bmp": _bmp(image),
        "noise.wav": _wav(rng),
        "price.eml": message.as_bytes(),
        "worker.ini": ini_text.getvalue().encode(),
        "csv.diff": "".join(
            difflib.unified_diff(old_lines, new_lines, "a/csv.py", "b/csv.py")
        ).encode(),
        "build.sh": shell.encode(),
        "modules.md": markdown.encode(),
        "csv.py.zlib": zlib.compress(source),
        "csv.py.b64": base64.b64encode(source[:6000]),
        "functools.html": pydoc.html.page("functools", pydoc.html.document(functools)).encode(),
        "words.tsv": "".join(f"{i}\t{w}\t{len(w)}\n" for i, w in enumerate(words)).encode(),
    }
    return out


def build_magika(model_dir: Path) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    source = model_dir / "model.onnx"
    source.write_bytes((magika_folder() / "model.onnx").read_bytes())
    config = magika_config()
    features = np.array([magika_features(c, config) for c in magika_corpus().values()], np.int32)
    (scores,) = OrtAdapter(source).run({"bytes": features}, ["target_label"])
    save_samples(model_dir, {"bytes": features}, {"target_label": scores})

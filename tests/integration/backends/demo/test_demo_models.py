"""The demo models against their references: ONNX Runtime on each source model
reproduces the stored reference outputs, the classifiers spread their sample
predictions over several classes, the transformer's numpy reference matches
ONNX Runtime on a fresh batch, and the magika samples are the features magika
itself extracts from the same files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from backends.demo.common import SAMPLES
from backends.demo.convnets import digit_images
from backends.demo.magika import magika_config, magika_corpus
from backends.demo.transformer import transformer_reference, transformer_weights

Arrays = dict[str, np.ndarray]


def _samples(repository: Path, model: str) -> tuple[Arrays, Arrays]:
    folder = repository / model / "samples"
    return dict(np.load(folder / "inputs.npz")), dict(np.load(folder / "reference.npz"))


def _run(repository: Path, model: str, inputs: Arrays) -> Arrays:
    session = ort.InferenceSession(
        str(repository / model / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


@pytest.mark.parametrize("model", ["cnn", "resnet", "mobilenet", "transformer", "magika"])
def test_onnx_runtime_reproduces_the_reference(repository: Path, model: str) -> None:
    inputs, reference = _samples(repository, model)
    assert all(len(a) == SAMPLES for a in [*inputs.values(), *reference.values()])
    got = _run(repository, model, inputs)
    assert got.keys() == reference.keys()
    for name, expected in reference.items():
        assert got[name].dtype == expected.dtype
        np.testing.assert_allclose(got[name], expected, rtol=0, atol=1e-4, err_msg=name)


@pytest.mark.parametrize(
    ("model", "output", "classes", "at_least"),
    [
        ("cnn", "probabilities", 10, 6),
        ("resnet", "probabilities", 10, 6),
        ("mobilenet", "probabilities", 10, 6),
        ("magika", "target_label", 214, 20),
    ],
)
def test_classifier_predictions_are_diverse(
    repository: Path, model: str, output: str, classes: int, at_least: int
) -> None:
    probabilities = _samples(repository, model)[1][output]
    assert probabilities.shape == (SAMPLES, classes)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    predicted = probabilities.argmax(axis=1)
    assert len(set(predicted.tolist())) >= at_least
    assert np.bincount(predicted).max() <= SAMPLES // 3


@pytest.mark.parametrize("model", ["cnn", "resnet", "mobilenet"])
def test_conv_nets_classify_their_held_out_digits(repository: Path, model: str) -> None:
    """The samples are held-out digits; the fitted heads get nearly all right, confidently."""
    images, labels = digit_images()
    inputs, reference = _samples(repository, model)
    held_out = [
        int(np.flatnonzero((images == image).all(axis=(1, 2, 3)))[0]) for image in inputs["image"]
    ]
    probabilities = reference["probabilities"]
    assert np.mean(probabilities.argmax(axis=1) == labels[held_out]) >= 0.9
    assert np.median(probabilities.max(axis=1)) >= 0.9


def test_transformer_numpy_reference_matches_onnx_runtime(repository: Path) -> None:
    tokens = np.random.default_rng(5).standard_normal((3, 16, 64)).astype(np.float32)
    expected = transformer_reference(tokens, transformer_weights())
    got = _run(repository, "transformer", {"tokens": tokens})["hidden"]
    assert got.shape == (3, 16, 64)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    # Layer-normalised rows: mean near the bias, spread near the scale; not collapsed.
    assert 0.5 < float(expected.std(axis=-1).mean()) < 2.0


@pytest.mark.parametrize(
    ("model", "input_shape", "ops"),
    [
        ("resnet", [3, 32, 32], {"BatchNormalization", "Conv", "Add", "Softmax"}),
        ("mobilenet", [3, 32, 32], {"BatchNormalization", "Conv", "Clip", "Softmax"}),
        ("transformer", [16, 64], {"LayerNormalization", "MatMul", "Softmax", "Erf"}),
    ],
)
def test_generated_models_have_a_symbolic_batch_and_static_dims(
    repository: Path, model: str, input_shape: list[int], ops: set[str]
) -> None:
    proto = onnx.load(repository / model / "model.onnx")
    onnx.checker.check_model(proto, full_check=True)
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "N"
        assert all(d.HasField("dim_value") for d in dims[1:])
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == input_shape
    assert ops <= {n.op_type for n in proto.graph.node}
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization":
            scale, bias, mean, var = (weights[name] for name in node.input[1:])
            assert scale.std() > 0.1 and bias.std() > 0.1 and mean.std() > 0 and var.std() > 0
    if model == "mobilenet":
        depthwise = [
            n for n in proto.graph.node if any(a.name == "group" and a.i > 1 for a in n.attribute)
        ]
        assert len(depthwise) == 5


def test_magika_samples_are_magikas_own_features(repository: Path) -> None:
    from magika import Magika

    labels = magika_config()["target_labels_space"]
    reference = _samples(repository, "magika")[1]["target_label"]
    magika = Magika()
    corpus = magika_corpus()
    assert len(corpus) == SAMPLES
    for name, content, scores in zip(corpus, corpus.values(), reference, strict=True):
        prediction = magika.identify_bytes(content).prediction
        assert prediction.dl.label == labels[int(scores.argmax())], name


def test_the_bench_only_tiny_conv_net_has_a_fixed_batch_and_passes_its_gates(
    tmp_path: Path,
) -> None:
    from backends.demo.models import build
    from backends.repository import ModelRepository

    assert build(tmp_path, ["tinyconv"]) == ["tinyconv"]
    scan = ModelRepository(tmp_path).scan("tinyconv")
    assert not scan.refused
    variants = {v.name: v.manifest for v in scan.variants}
    assert set(variants) >= {"ort-cpu-fp32", "ort-cpu-int8-qdq"}
    for manifest in variants.values():
        assert manifest.max_batch_size == 0  # fixed batch 1: nothing to merge
        assert manifest.accuracy is not None and manifest.accuracy.passed
        assert manifest.accuracy.samples == 64

"""The `digits` demo model: a logistic-regression classifier trained with
scikit-learn on its bundled 8x8 digits dataset, converted with skl2onnx.
Reference outputs come from scikit-learn itself.

Imports no grpc, no generated protobuf and nothing from the gateway.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backends.demo.common import OPSET, SAMPLES, save_samples


def build_digits(model_dir: Path) -> None:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, _ = train_test_split(x, data.target, test_size=0.25, random_state=0)
    clf = LogisticRegression(max_iter=2000, random_state=0).fit(x_train, y_train)
    onx = to_onnx(
        clf,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": 3},
    )
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.onnx").write_bytes(onx.SerializeToString())
    sample = x_test[:SAMPLES]
    save_samples(
        model_dir,
        {"input": sample},
        {
            "label": clf.predict(sample).astype(np.int64),
            "probabilities": clf.predict_proba(sample).astype(np.float32),
        },
    )

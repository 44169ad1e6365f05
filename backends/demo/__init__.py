"""The demo models, built from code (trained and exported here, nothing downloaded).

One module per model family: `digits`, `convnets` (cnn, resnet, mobilenet),
`transformer`, `magika`, `echo`; `common` holds what they share. `models` is the
registry and the command line (`python -m backends.demo`).

Imports nothing from the gateway, and no grpc or generated protobuf.
"""

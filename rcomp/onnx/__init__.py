"""ONNX export and ONNX Runtime: the file a user ships, measured like a checkpoint.

* :mod:`rcomp.onnx.deps` -- the optional extra (``pip install 'rcomp[onnx]'``), checked in one place;
* :mod:`rcomp.onnx.export` -- a Classifier -> ONNX bytes (dynamic batch axis, rcomp's metadata in
  ``metadata_props``) and the parity check against the model it came from;
* :mod:`rcomp.onnx.runtime` -- :class:`~rcomp.onnx.runtime.OnnxClassifier`, an ``nn.Module``-like adapter
  that runs ONNX Runtime in ``forward`` (no autograd) with ``.meta`` read from the file, so the
  evaluation loop, attacks that only query the model (Square) and replays work on the shipped file;
* :mod:`rcomp.onnx.ortquant` -- ONNX Runtime static QDQ int8, with the activation type chosen by CPU.

Nothing here imports onnx or onnxruntime at import time; only commands that need them do.
"""

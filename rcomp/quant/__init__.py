"""Quantization: real int8 (torch.ao FX, CPU kernels) and simulated 2..16-bit fake-quant models.

* :func:`rcomp.quant.ptq.quantize` -- post-training quantization of a Classifier;
* :mod:`rcomp.quant.storage` -- pickle-free export/restore for checkpoints;
* :mod:`rcomp.quant.surrogate` -- the fake-quant twin that gives int8 models gradients;
* :mod:`rcomp.quant.qat` -- ``to_trainable`` / ``from_trainable`` for quantization-aware fine-tuning;
* :mod:`rcomp.quant.backend` -- the one small interface over ``torch.ao.quantization``.
"""

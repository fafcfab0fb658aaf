"""FP8 fine-grained mixed precision (spec §3): e4m3 everywhere, 1x128 activation tiles, 128x128 weight
blocks, online amax scales, fp32 promotion every 128 K-elements.

  reference.py  pure-torch quantisation and block-scaled GEMMs (CPU path; the twin of every kernel)
  kernels.py    Triton kernels (imported lazily: a CPU import never needs CUDA or Triton)
  ops.py        torch.library custom ops dispatching to reference / triton / cublas (`torch._scaled_mm`)
  linear.py     FP8 Linear (Fprop, Dgrad, Wgrad in FP8) for training
  experts.py    FP8 grouped routed experts for training, with the MoE's dispatch and combine fused in
  gluon_gemm.py the Hopper grouped GEMMs (Gluon: promotion overlapped with the next wgmma, persistent)
  convert.py    which layers run FP8 and the in-place swap (`precision.prepare_model(model, "fp8")`)
  inference.py  FP8 checkpoints loaded and run with e4m3 weights (`load_fp8_for_inference`)
"""

from .convert import convert_to_fp8, describe_model
from .inference import load_fp8_for_inference

__all__ = ["convert_to_fp8", "describe_model", "load_fp8_for_inference"]

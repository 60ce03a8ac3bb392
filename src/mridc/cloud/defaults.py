"""The cloud's default decodes, shared by the service and `mridc-cloud decode` (no torch import here, so
command-line help can show them).

A first picture at realism 0, and a refined one at realism 0.5 with one DDIM step (DEFAULT_REFINE_STEPS
are the steps at realism 1). `mridc-bench refine` measured that refinement at the quality of the old 4-step
one for 0.44x its cost (docs/results/refine).
"""

DEFAULT_PREVIEW_REALISM = 0.0
DEFAULT_REFINE_REALISM = 0.5
DEFAULT_REFINE_STEPS = 2
DEFAULT_BACKEND = "auto"  # ONNX Runtime on a CPU (mridc.cloud.accel), PyTorch on CUDA

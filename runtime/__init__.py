"""meshplan's runtime: trains a GPT exactly as a plan.json says, with PyTorch's own distributed building blocks.

Entry point: `torchrun --nproc-per-node N -m runtime.launch plan.json` (see runtime/launch.py)."""

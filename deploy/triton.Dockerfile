# Triton with what FusionRec's python-backend models import (torch, transformers, numpy<2):
# the same pins as the embedded Triton's requirements-triton.txt, less nvidia-pytriton (the
# NGC image ships tritonserver itself).
#   docker build -f deploy/triton.Dockerfile -t fusionrec-triton:0.1.0 .   (context: repository root)
FROM nvcr.io/nvidia/tritonserver:24.10-py3
COPY requirements-triton.txt /tmp/requirements-triton.txt
# model.py runs in the image's python3; HF_HUB_OFFLINE: weights come from the model repository only.
RUN grep -v '^nvidia-pytriton' /tmp/requirements-triton.txt > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements*.txt
ENV HF_HUB_OFFLINE=1

"""Training pieces of the QLoRA pipeline, one small file per concern.

* :mod:`.qat`      fake-quantized modules (QAT) by module swap, and their conversion to packed ones
* :mod:`.lora`     ``LoRALinear``: a bf16 low-rank side path around any linear (float, QAT or int4)
* :mod:`.records`  SFT and preference records from local files or ``datasets``, tokenized
* :mod:`.sft`      response-only SFT loss and per-sequence log-probabilities
* :mod:`.dpo`      the DPO loss and held-out preference metrics
* :mod:`.loops`    the resumable training loop (AdamW, schedule, safetensors step checkpoints)
"""

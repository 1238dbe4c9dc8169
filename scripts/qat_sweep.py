"""One QAT stage of `quantkit qlora`, alone, scored as fake-quantized perplexity (docs/measurements/qlora.md).

Trains every weight (and, with ``--learn-scales``, the int4 group scales) of the default model
by distillation from its float copy on windows of the ``wikitext2`` calibration set, with the
package's own pieces (``prepare_qat``, ``stage_loss``, ``train``), then scores the fake-quantized
float32 model on the first WikiText-2 test windows. ``--rotate`` (the CLI's ``--qat-rotate``)
folds random Hadamard R1/R2 into the float weights first; ``--gptq-init N`` (the CLI's ``--qat-init
gptq``, on windows of another seed) starts from GPTQ's codes and scales on N calibration windows
instead of RTN. A variant the CLI does not offer: ``--hidden-weight W`` adds W times the mean,
over layers, of each layer output's squared error relative to the teacher's mean square. Writes
a JSON line to stdout (and ``--json FILE``).

    python scripts/qat_sweep.py --lr 5e-5 --learn-scales --weight-clip mse --rotate --gptq-init 32
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

from quantkit.algorithms.gptq import gptq_model_
from quantkit.algorithms.rotation import fold_rotations_
from quantkit.data import calibration_tokens, encode, wikitext2_test_text
from quantkit.evaluate import perplexity
from quantkit.model import load_model
from quantkit.scheme import Scheme, WeightClip
from quantkit.training.loops import train
from quantkit.training.qat import QATLinear, prepare_qat, scale_lr_ratios
from quantkit.training.records import Tokenized, collate
from quantkit.training.sft import StageLoss, kd_loss, stage_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps, one window each")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (warm-up, cosine)")
    p.add_argument("--learn-scales", action="store_true", help="learned int4 group scales (a tenth of --lr)")
    p.add_argument("--weight-clip", choices=[c.value for c in WeightClip], default="amax")
    p.add_argument("--rotate", action="store_true", help="fold random Hadamard R1/R2 into the weights first")
    p.add_argument("--gptq-init", type=int, default=0, metavar="N", help="start from GPTQ on N windows")
    p.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the per-layer hidden-state loss")
    p.add_argument("--int8-block-weights", action="store_true",
                   help="block linears on an int8 g32 grid instead of int4 (with --steps 0: what quantizing "
                        "the activations, head and embedding alone costs)")
    p.add_argument("--eval-windows", type=int, default=4, help="WikiText-2 test windows of --eval-seq-len")
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = p.parse_args()

    torch.manual_seed(0)
    loaded = load_model(a.model)
    model, tok = loaded.model.float(), loaded.tokenizer
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    scheme = Scheme(weight_clip=WeightClip(a.weight_clip))
    if a.rotate:
        fold_rotations_(model, seed=0)
    gptq_scales = None
    if a.gptq_init:  # weights now on GPTQ's grid; learned scales start from GPTQ's
        ids = calibration_tokens(tok, "wikitext2", a.gptq_init, a.seq_len, 1, None)
        gptq_scales = gptq_model_(model, ids, scheme.linear_bits, scheme.group_size, scheme.scale_dtype.torch,
                                  scheme.weight_clip)
    prepare_qat(model, scheme, a.learn_scales, gptq_scales)
    if a.int8_block_weights:
        for mod in model.modules():
            if isinstance(mod, QATLinear) and mod.group_size is not None:
                mod.weight_bits = 8
    text = wikitext2_test_text(None)
    ids = encode(tok, text[: 16 * a.eval_seq_len * (a.eval_windows + 1)])  # the start of the split suffices

    def ppl() -> float:
        model.eval()
        with torch.no_grad():
            value = perplexity(model, ids, a.eval_seq_len, a.eval_windows).perplexity
        model.train()
        return value

    result = {"args": {k: str(v) for k, v in vars(a).items()}, "perplexity_before": ppl()}
    windows = calibration_tokens(tok, "wikitext2", max(1, a.steps), a.seq_len, 0, None)  # [steps, L]: i at step i

    def loss(step: int) -> torch.Tensor:
        batch = collate([Tokenized(windows[step].tolist(), 0)], 0)
        if not a.hidden_weight:
            return stage_loss(model, batch, StageLoss.KD, teacher)
        return _kd_and_hidden(model, teacher, batch.input_ids, a.hidden_weight)

    params = dict(model.named_parameters())
    model.train()
    with tempfile.TemporaryDirectory() as tmp:
        losses = train("qat", params, a.steps, a.lr, loss, Path(tmp) / "progress", a.steps + 1,
                       scale_lr_ratios(params))
    result["perplexity"] = ppl()
    if losses:
        first, last = losses[:10], losses[-10:]
        result.update(loss_first10=sum(first) / len(first), loss_last10=sum(last) / len(last))
    line = json.dumps(result)
    sys.stdout.write(line + "\n")
    if a.json:
        a.json.write_text(line + "\n")


def _kd_and_hidden(model, teacher, input_ids: torch.Tensor, weight: float) -> torch.Tensor:
    """KD on the next-token distributions plus ``weight`` x the layers' relative hidden-state error."""
    out = model.model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    with torch.no_grad():
        ref = teacher.model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    kd = kd_loss(model.get_output_embeddings()(out.last_hidden_state[0, :-1]),
                 teacher.get_output_embeddings()(ref.last_hidden_state[0, :-1]))
    pairs = list(zip(out.hidden_states[1:], ref.hidden_states[1:], strict=True))  # every layer's output
    hidden = sum(((h - t) ** 2).mean() / (t**2).mean() for h, t in pairs) / len(pairs)
    return kd + weight * hidden


if __name__ == "__main__":
    main()

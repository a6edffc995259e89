"""Each model family's engine cost and ``auto``'s pick, on the arithmetic and language shapes.

Families: the arithmetic example's transformer, ``nn.GRU`` and ``nn.LSTM`` language models,
``nn.TransformerEncoder`` and ``nn.TransformerDecoder`` language models (causal and
padding masks), Hugging Face GPT-2, Llama and BERT (masked LM), and convolutional
classifiers with ``BatchNorm2d`` and with ``GroupNorm``. All at d=64, 2 layers, random
initialisation. Shapes:

- arithmetic: 200 sequences of 12 tokens, the last 4 loss-bearing (BERT: 4 masked);
- language: 16 sequences of 64 tokens, every position after the first loss-bearing
  (BERT: 10 masked, 15%);
- classifier: 200 8x8 images, one loss token each.

For each: a plain forward pass over the probe batch (no gradient), forward mode and
reverse mode with K directions, in plain forward passes (forward mode per direction,
reverse mode per loss-bearing position), the reverse path taken (activations,
vmapped per-sample Jacobians, or per-sample Jacobians on real batches of one), and the
engine ``auto`` picks for K after measuring both as the callback does.

Usage:
    python benchmarks/engine_families.py            # K=16, about 10 minutes on 2 CPU cores
    python benchmarks/engine_families.py --quick    # smaller probe batches, K=4
    python benchmarks/engine_families.py --no-activations --only GPT   # per-sample Jacobians instead
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _families import ConvNet, DecoderLM, EncoderLM, RecurrentLM  # noqa: E402

from polca_lightning.core.engine import DirectionalDerivatives  # noqa: E402
from polca_lightning.core.functional import ParameterSpace, evaluation_mode  # noqa: E402
from polca_lightning.core.losses import causal_lm_token_loss, classifier_token_loss, masked_lm_token_loss  # noqa: E402
from polca_lightning.toy import TinyTransformer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import timed  # noqa: E402  (benchmarks/engine.py: best of `repeat` wall times)

VOCAB, D = 64, 64


def hf(arch: str, length: int):
    import transformers as T

    if arch == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_positions=length, n_embd=D, n_layer=2, n_head=4,
                                              bos_token_id=0, eos_token_id=0))
    if arch == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=4 * D,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=length, bos_token_id=0, eos_token_id=0))
    return T.BertForMaskedLM(T.BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=4 * D, max_position_embeddings=length, pad_token_id=0))


FAMILIES = {  # name -> (kind, model for a sequence length)
    "arithmetic transformer (ours)": ("lm", lambda L: TinyTransformer(vocab=VOCAB, d_model=D, n_layers=2, n_heads=4,
                                                                       max_len=L)),
    "nn.GRU LM": ("lm", lambda L: RecurrentLM("gru", vocab=VOCAB, hidden=D, layers=2)),
    "nn.LSTM LM": ("lm", lambda L: RecurrentLM("lstm", vocab=VOCAB, hidden=D, layers=2, batch_first=False)),
    "nn.TransformerEncoder LM": ("lm", lambda L: EncoderLM(vocab=VOCAB, d=D, layers=2, heads=4, max_len=L)),
    "nn.TransformerDecoder LM": ("lm", lambda L: DecoderLM(vocab=VOCAB, d=D, layers=2, heads=4, max_len=L)),
    "GPT-2 (transformers)": ("lm", lambda L: hf("gpt2", L)),
    "Llama (transformers)": ("lm", lambda L: hf("llama", L)),
    "BERT masked LM (transformers)": ("mlm", lambda L: hf("bert", L)),
    "conv + BatchNorm2d + Dropout": ("image", lambda L: ConvNet("batch", channels=16)),
    "conv + GroupNorm": ("image", lambda L: ConvNet("group", channels=16)),
}


def batch_for(kind: str, shape: str, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "image":
        return (torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen))
    length = 12 if shape == "arithmetic" else 64
    ids = torch.randint(1, VOCAB, (n, length), generator=gen)
    if kind == "mlm":
        masked = 4 if shape == "arithmetic" else 10
        labels = torch.full_like(ids, -100)
        for i in range(n):
            pos = torch.randperm(length, generator=gen)[:masked]
            labels[i, pos], ids[i, pos] = ids[i, pos], 1
        return {"input_ids": ids, "labels": labels}
    if shape == "arithmetic":
        labels = torch.full_like(ids, -100)
        labels[:, -4:] = ids[:, -4:]
        return {"input_ids": ids, "labels": labels}
    return {"input_ids": ids}


def reverse_path(dd: DirectionalDerivatives) -> str:
    if dd._ghost is not None:
        return "activations"
    return "vmapped Jacobians" if dd._jacobians.vmapped else "batches of one"


def measure(name: str, shape: str, n: int, k: int) -> dict:
    kind, make = FAMILIES[name]
    torch.manual_seed(0)
    batch = batch_for(kind, shape, n)
    model = make(12 if shape == "arithmetic" else 64)
    token_loss = {"lm": causal_lm_token_loss, "mlm": masked_lm_token_loss, "image": classifier_token_loss}[kind]
    space = ParameterSpace.from_module(model)
    theta = space.flatten(model)
    V = torch.linalg.qr(torch.randn(space.dim, k)).Q.T.contiguous()
    engines = {e: DirectionalDerivatives(model, token_loss, space, engine=e) for e in ("forward", "reverse", "auto")}
    with evaluation_mode(model), torch.no_grad():
        loss, mask, _ = engines["forward"].fn(theta, batch)
        plain = timed(lambda: engines["forward"].fn(theta, batch), repeat=3)
    positions = float(mask.sum(1).float().mean())
    row = {"family": name, "shape": shape, "params": space.dim, "positions": positions}
    for e in ("forward", "reverse"):
        engines[e](theta, [batch], V)  # warm-up: one-time checks and fallbacks
        row[e] = timed(lambda e=e: engines[e](theta, [batch], V), repeat=2) / plain
    row["forward_per_direction"] = row["forward"] / k
    row["reverse_per_position"] = row["reverse"] / positions
    row["reverse_path"] = reverse_path(engines["reverse"])
    engines["auto"].calibrate(theta, batch, max_directions=k)
    row["auto"] = engines["auto"].choose(theta, [batch], k, False)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small probe batches and K=4 (a smoke run)")
    parser.add_argument("--only", default=None, help="families whose name contains this text")
    parser.add_argument("--no-activations", action="store_true",
                        help="reverse mode without the activation path: per-sample Jacobians for every model")
    args = parser.parse_args()
    if args.no_activations:
        import polca_lightning.core.engine

        polca_lightning.core.engine.ghost_plan = lambda *a, **k: None
    k = 4 if args.quick else 16
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, K={k}")
    print()
    print("| family | shape | parameters | loss positions per sequence | forward passes per direction "
          "| reverse passes per loss position | reverse path | auto picks |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (kind, _) in FAMILIES.items():
        if args.only and args.only.lower() not in name.lower():
            continue
        shapes = ("classifier",) if kind == "image" else ("arithmetic", "language")
        for shape in shapes:
            n = {"arithmetic": 200, "language": 16, "classifier": 200}[shape]
            if args.quick:
                n = max(4, n // 8)
            r = measure(name, shape, n, k)
            print(f"| {r['family']} | {r['shape']} | {r['params']:,} | {r['positions']:.0f} | "
                  f"{r['forward_per_direction']:.2f} | {r['reverse_per_position']:.2f} | {r['reverse_path']} | "
                  f"{r['auto']} |", flush=True)


if __name__ == "__main__":
    main()

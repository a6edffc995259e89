"""Tiny models of the families people train, written the way their training scripts write them.

Used by the engine tests and the conformance suite. Each comes with the token loss its
training step would use; none is written to suit the engine.
"""

import torch
import torch.nn.functional as F
from torch import nn


class RecurrentLM(nn.Module):
    """Embedding, a multi-layer ``nn.GRU``/``nn.LSTM``, a linear head: ``ids [B, L] -> logits [B, L, V]``."""

    def __init__(self, kind: str = "gru", vocab: int = 12, hidden: int = 6, layers: int = 2, batch_first: bool = True):
        super().__init__()
        self.kind, self.hidden, self.batch_first = kind, hidden, batch_first
        self.emb = nn.Embedding(vocab, hidden)
        self.rnn = (nn.GRU if kind == "gru" else nn.LSTM)(hidden, hidden, num_layers=layers, batch_first=batch_first)
        self.head = nn.Linear(hidden, vocab)

    def init_hidden(self, batch_size: int):
        """Zeros for the recurrent state, as RNN training loops build it."""
        h = torch.zeros(self.rnn.num_layers, batch_size, self.hidden, dtype=self.head.weight.dtype,
                        device=self.head.weight.device)
        return h if self.kind == "gru" else (h, torch.zeros_like(h))

    def forward(self, ids, hidden=None):
        x = self.emb(ids)  # [B, L, H]
        if not self.batch_first:
            x = x.transpose(0, 1)  # [L, B, H]
        y, _ = self.rnn(x, hidden)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.head(y)  # [B, L, V]


def rnn_token_loss(module, batch):
    """Next-token loss with the hidden state created from the batch size (``init_hidden(x.shape[0])``)."""
    ids = batch if isinstance(batch, torch.Tensor) else batch["input_ids"]
    net = getattr(module, "net", module)
    logits = net(ids, net.init_hidden(ids.shape[0]))  # [B, L, V]
    step = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # [B, L-1]
    loss = F.pad(step, (1, 0))  # position p: the loss of predicting token p
    mask = torch.ones_like(loss, dtype=torch.bool)
    mask[:, 0] = False
    return loss, mask, F.pad(ids[:, 1:], (1, 0), value=-1)


def _embedded_with_masks(model, input_ids, attention_mask):
    """Token plus position embeddings ``[B, L, d]``, the causal mask ``[L, L]`` (True: not
    attended) and the key padding mask ``[B, L]`` (True: padding; None without a mask)."""
    L = input_ids.shape[1]
    x = model.emb(input_ids) + model.pos(torch.arange(L, device=input_ids.device))
    causal = torch.ones(L, L, dtype=torch.bool, device=input_ids.device).triu(1)
    pad = None if attention_mask is None else attention_mask == 0
    return x, causal, pad


class EncoderLM(nn.Module):
    """``nn.TransformerEncoder`` with a causal mask and ``src_key_padding_mask``, padded batches."""

    def __init__(self, vocab: int = 12, d: int = 8, layers: int = 2, heads: int = 2, max_len: int = 12):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=16, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        x, causal, pad = _embedded_with_masks(self, input_ids, attention_mask)
        return self.head(self.encoder(x, mask=causal, src_key_padding_mask=pad, is_causal=True))


class DecoderLM(nn.Module):
    """``nn.TransformerDecoder`` over a learned memory of the prefix: causal mask and key padding masks."""

    def __init__(self, vocab: int = 12, d: int = 8, layers: int = 1, heads: int = 2, max_len: int = 12):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        layer = nn.TransformerDecoderLayer(d, heads, dim_feedforward=16, dropout=0.1, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.memory = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        x, causal, pad = _embedded_with_masks(self, input_ids, attention_mask)
        y = self.decoder(x, self.memory(x), tgt_mask=causal, memory_mask=causal, tgt_key_padding_mask=pad,
                         memory_key_padding_mask=pad, tgt_is_causal=True)
        return self.head(y)


class ConvNet(nn.Module):
    """A small image classifier: conv, ``BatchNorm2d`` or ``GroupNorm``, dropout, linear head."""

    def __init__(self, norm: str = "batch", classes: int = 3, channels: int = 4):
        super().__init__()
        make_norm = (lambda c: nn.BatchNorm2d(c)) if norm == "batch" else (lambda c: nn.GroupNorm(2, c))
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), make_norm(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), make_norm(channels), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.2),
        )
        self.head = nn.Linear(4 * channels, classes)

    def forward(self, x):
        return self.head(self.features(x))


class LogFeatureMLP(nn.Module):
    """A classifier on log-features: an input with a negative feature has a NaN loss."""

    def __init__(self, n_in: int = 3, hidden: int = 5, classes: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(torch.log(x))


class ZetaMLP(nn.Module):
    """An activation with no derivative in torch (``torch.special.zeta`` in its first argument)."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(3, 5), nn.Linear(5, 4)

    def forward(self, x):
        h = torch.special.zeta(2.0 + F.softplus(self.inp(x)), torch.ones((), dtype=x.dtype))
        return self.out(h)


def _sample(batch, i):
    """Sample ``i`` of a tensor, tuple/list or dict batch, as a batch of one."""
    if isinstance(batch, torch.Tensor):
        return batch[i : i + 1]
    if isinstance(batch, dict):
        return {k: _sample(v, i) for k, v in batch.items()}
    return type(batch)(_sample(v, i) for v in batch)


def _size(batch):
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    return _size(next(iter(batch.values())) if isinstance(batch, dict) else batch[0])


def own_per_token_grads(model, token_loss, batch, names, directions):
    """``loss [T]``, ``g [K, T]``: every token's gradient by ``torch.autograd.grad`` through the module's own
    parameters (no functional call, no engine), each sample alone as a batch of one (through a batch
    graph a NaN sample makes every weight gradient NaN), in eval mode, projected on ``directions [K, d]``."""
    params = dict(model.named_parameters())
    chosen = [params[n] for n in names]
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    losses, rows = [], []
    try:
        with torch.enable_grad():
            for i in range(_size(batch)):
                loss, mask = token_loss(model, _sample(batch, i))[:2]
                for value in loss[mask]:
                    grads = torch.autograd.grad(value, chosen, retain_graph=True, allow_unused=True)
                    rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                           for g, p in zip(grads, chosen)]))
                    losses.append(value.detach())
    finally:
        for m, training in was:
            m.training = training
    return torch.stack(losses), directions.to(rows[0]) @ torch.stack(rows).T  # [T], [K, T]

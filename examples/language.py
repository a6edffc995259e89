"""English language modelling with POLCA: the paper's section 5 on a CPU-sized run.

A small causal transformer learns next-word prediction on real English: the help texts
of Python's own documentation (``pydoc_data.topics``, about 465,000 characters, shipped
with CPython, so nothing is downloaded). A word-level tokenizer built here lower-cases
the text and splits it into words and punctuation; the most frequent ``--vocab`` words
of the training split form the vocabulary, the rest become ``<unk>``. The token stream is
cut into sequences of ``--seq-len`` words; a random tenth of them is held out, and the
probe is ``--probe`` of those held-out sequences, whose second half (positions
``seq_len // 2`` onwards, ``<unk>`` targets excluded) is loss-bearing, so every probe
token has at least ``seq_len // 2`` words of context. The Hessian sample is drawn from
the training split, and the model trains on random windows of it.

``POLCACallback`` snapshots the model every ``--snapshot-every`` steps, adds a Hessian
eigenvector every ``--basis-every`` steps and streams per-token POLCA into a Zarr store.
After training it clusters each kept vector's projected-loss trajectories and logs the
report to W&B (offline: no account needed; ``wandb sync`` uploads the run later), with
the contexts nearest each cluster's medoid (the 8 words before the target, the target in
brackets) and the target words most common in each cluster. Every probe token carries
the label ``kind`` (0 = word, 1 = punctuation or symbol, 2 = number).

The paper's run (section 5, appendix D): a 3-layer, 40M-parameter model on Wikipedia,
14,000 steps, a basis vector every 750 steps, 30 in all, POLCA every 200 steps, 12,600
probe tokens. This one is scaled to a CPU.

Usage:
    python examples/language.py                  # the default run (6 CPU minutes; 8-11 min on 2 busy cores)
    python examples/language.py --tiny           # seconds: the CI smoke run
    python examples/language.py --help

Then:
    polca info runs/language/polca.zarr
    python -c "import polca_lightning as p; print(p.open_store('runs/language/polca.zarr'))"
"""

from __future__ import annotations

import argparse
import sys
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from polca_lightning import POLCACallback, open_store
from polca_lightning.toy import TinyCausalLM

UNK = "<unk>"
#: one token: a word (letters, digits, underscores, an apostrophe suffix), a number, or
#: one punctuation or symbol character
TOKEN_PATTERN = re.compile(r"[a-z_][a-z0-9_]*(?:'[a-z]+)?|[0-9]+|[^\sa-z0-9_]")
#: reStructuredText underlines and table borders ("*****", "-----", "+---+"): not text
_RULE_LINE = re.compile(r"[\s\-*=~^+|]*")
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})
#: no space before these when words are joined back into text, none after the openers
_NO_SPACE_BEFORE = set(".,:;!?)]}'-")
_NO_SPACE_AFTER = set("([{-")
KIND_WORD, KIND_PUNCT, KIND_NUMBER = 0, 1, 2


def load_text() -> str:
    """The English help texts of Python's documentation (``pydoc_data.topics``).

    Raises:
        RuntimeError: this Python has no ``pydoc_data`` (some distributions strip it), or
            its topics are empty.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as error:
        raise RuntimeError(
            "examples/language.py trains on the help texts of Python's documentation, the module "
            f"pydoc_data.topics, which this Python ({sys.executable}) lacks ({error}); some Linux "
            "distributions leave it out of their Python packages. A Python from python.org or conda "
            "includes it"
        ) from error
    text = "\n".join(topics[name] for name in sorted(topics))
    if len(text) < 10_000:
        raise RuntimeError(f"pydoc_data.topics holds only {len(text)} characters of text; expected ~465,000")
    return text


def tokenize(text: str) -> list[str]:
    """Lower-cased words and punctuation, rule lines (``*****``, ``+---+``) dropped."""
    text = text.translate(_QUOTES).lower()
    lines = [line for line in text.splitlines() if not _RULE_LINE.fullmatch(line)]
    return TOKEN_PATTERN.findall("\n".join(lines))


def token_kind(word: str) -> int:
    """``KIND_NUMBER`` for digits, ``KIND_PUNCT`` for one non-word character, else ``KIND_WORD``."""
    if word.isdigit():
        return KIND_NUMBER
    if len(word) == 1 and not (word.isalnum() or word == "_"):
        return KIND_PUNCT
    return KIND_WORD


class WordTokenizer:
    """A vocabulary of the ``size`` most frequent words, plus ``<unk>`` (id 0).

    Args:
        words: the training words the vocabulary is counted on.
        size: words kept (ties broken alphabetically, so the ids are reproducible).

    Example:
        >>> tok = WordTokenizer(tokenize("The cat sat. The end."), size=3)
        >>> tok.words, tok.encode(["the", "dog"]).tolist()
        (['<unk>', '.', 'the', 'cat'], [2, 0])
    """

    def __init__(self, words: list[str], size: int):
        if size < 1:
            raise ValueError(f"size: expected a positive vocabulary size, got {size}")
        counts = Counter(words)
        ranked = sorted(counts, key=lambda w: (-counts[w], w))[:size]
        self.words = [UNK] + ranked
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.kinds = torch.tensor([-1] + [token_kind(w) for w in ranked])  # [vocab]

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, words: list[str]) -> torch.Tensor:
        """Token ids ``[len(words)]`` (``<unk>`` = 0 for words outside the vocabulary)."""
        return torch.tensor([self.ids.get(w, 0) for w in words], dtype=torch.long)

    def word(self, token_id: int) -> str:
        """The word of one id (what ``decode_target`` shows)."""
        return self.words[int(token_id)]

    def text(self, ids) -> str:
        """Ids joined back into readable text: spaces between words, none before ``.,:;)``."""
        out = ""
        for i in ids:
            w = self.words[int(i)]
            if out and not (w in _NO_SPACE_BEFORE or out[-1] in _NO_SPACE_AFTER):
                out += " "
            out += w
        return out


def language_data(seq_len: int, vocab: int, probe: int, hessian: int, seed: int) -> dict:
    """The tokenizer, the held-out probe sequences, the training stream and the Hessian sample.

    The stream is cut into sequences of ``seq_len`` tokens; a random tenth is held out
    (the probe is drawn from it); training windows start anywhere in the rest that does
    not overlap a held-out sequence. The vocabulary is counted on the training part only.

    Returns:
        dict with ``tokenizer``, ``probe`` (``input_ids`` ``[probe, seq_len]``, ``labels``:
        -100 except the second half, ``<unk>`` targets excluded; ``kind`` -1 except where
        labels are), ``hessian`` (``input_ids`` ``[hessian, seq_len]``), ``stream`` (all
        token ids) and ``train_starts`` (where training windows may start).

    Raises:
        ValueError: the text is too short for the requested probe or Hessian sample.
    """
    words = tokenize(load_text())
    n_seq = len(words) // seq_len
    gen = torch.Generator().manual_seed(seed)
    held = torch.randperm(n_seq, generator=gen)[: max(1, n_seq // 10)].sort().values
    if probe > held.numel():
        raise ValueError(f"probe: {probe} sequences asked, but the held-out tenth holds {held.numel()} of "
                         f"{seq_len} tokens")
    is_held = torch.zeros(n_seq + 1, dtype=torch.bool)
    is_held[held] = True
    train_words = [w for s in range(n_seq) if not is_held[s] for w in words[s * seq_len:(s + 1) * seq_len]]
    tokenizer = WordTokenizer(train_words, vocab)
    stream = tokenizer.encode(words[: n_seq * seq_len])  # [n_seq * seq_len]
    # a window [s, s + seq_len) is training data when it overlaps no held-out sequence:
    # the sequence s // seq_len and (unless s is aligned) the next one are both training ones
    starts = torch.arange(0, (n_seq - 1) * seq_len + 1)
    first, aligned = starts // seq_len, starts % seq_len == 0
    ok = ~is_held[first] & (aligned | ~is_held[first + 1])
    train_starts = starts[ok]
    if hessian > train_starts.numel():
        raise ValueError(f"hessian: {hessian} sequences asked, the training split has {train_starts.numel()}")

    chosen = held[torch.randperm(held.numel(), generator=gen)[:probe]].sort().values
    probe_ids = stream.view(n_seq, seq_len)[chosen]  # [probe, seq_len]
    labels = torch.full_like(probe_ids, -100)
    half = seq_len // 2
    labels[:, half:] = probe_ids[:, half:]
    labels[labels == 0] = -100  # <unk> targets: nothing to learn about
    kind = torch.where(labels >= 0, tokenizer.kinds[probe_ids], torch.full_like(probe_ids, -1))
    h_starts = train_starts[torch.randperm(train_starts.numel(), generator=gen)[:hessian]]
    return {
        "tokenizer": tokenizer,
        "probe": {"input_ids": probe_ids, "labels": labels, "kind": kind},
        "hessian": {"input_ids": windows(stream, h_starts, seq_len)},
        "stream": stream,
        "train_starts": train_starts,
        "n_words": len(words),
    }


def windows(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``stream[s : s + seq_len]`` for every start: ``[len(starts), seq_len]``."""
    return stream[starts[:, None] + torch.arange(seq_len)]


def batches(data: dict, size: int, keys=("input_ids", "labels", "kind")) -> list[dict]:
    n = len(data["input_ids"])
    return [{k: data[k][i : i + size] for k in keys if k in data} for i in range(0, n, size)]


def decode(tokenizer: WordTokenizer, probe: dict, sequence: int, position: int, before: int = 8) -> str:
    """A probe token's context: the ``before`` words preceding it, the target in brackets."""
    ids = probe["input_ids"][sequence].tolist()
    context = tokenizer.text(ids[max(0, position - before) : position])
    return f"{context} [{tokenizer.word(ids[position])}]".replace("\n", " ")


def token_labels(batch: dict) -> dict:
    """The ``kind`` of every target (0 word, 1 punctuation, 2 number; -1 where no token)."""
    return {"kind": batch["kind"]}


PRESETS = {
    # CPU default: 6 minutes of CPU time on one thread (README: measured)
    "default": dict(steps=1600, batch=32, seq_len=32, vocab=2000, d_model=96, n_layers=2, n_heads=4, lr=1e-3,
                    probe=128, hessian=128, snapshot_every=40, basis_every=160, k=1, max_basis=10),
    # CI smoke run: seconds
    "tiny": dict(steps=24, batch=16, seq_len=16, vocab=300, d_model=16, n_layers=1, n_heads=2, lr=3e-3,
                 probe=24, hessian=32, snapshot_every=4, basis_every=8, k=2, max_basis=4),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CI)")
    p.add_argument("--out", default="runs/language", help="output folder (store, W&B run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order", default="trapezoid", choices=["first", "second", "trapezoid", "exact"])
    p.add_argument("--engine", default="auto", choices=["auto", "forward", "reverse"])
    p.add_argument("--wandb-project", default="polca-language")
    p.add_argument("--online", action="store_true", help="log to W&B online (default: offline)")
    p.add_argument("--no-wandb", action="store_true", help="no W&B: figures go to a folder beside the store")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store in --out")
    for name, value in PRESETS["default"].items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None,
                       help=f"(default {value}; --tiny: {PRESETS['tiny'][name]})")
    args = p.parse_args(argv)
    preset = PRESETS["tiny" if args.tiny else "default"]
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.seq_len < 4:
        p.error(f"--seq-len: expected at least 4 tokens, got {args.seq_len}")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    out = Path(args.out)
    store = out / "polca.zarr"
    if store.exists() and args.overwrite:
        shutil.rmtree(store)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(args.seed, verbose=False)

    data = language_data(args.seq_len, args.vocab, args.probe, args.hessian, args.seed)
    tokenizer, probe = data["tokenizer"], data["probe"]
    gen = torch.Generator().manual_seed(1_000 + args.seed)
    picks = torch.randint(0, data["train_starts"].numel(), (args.steps, args.batch), generator=gen)
    train = [{"input_ids": windows(data["stream"], data["train_starts"][row], args.seq_len)} for row in picks]
    print(f"text: {data['n_words']} tokens of pydoc_data.topics, vocabulary {len(tokenizer)} "
          f"(<unk> {float((data['stream'] == 0).float().mean()):.1%} of the stream); "
          f"probe {len(probe['input_ids'])} held-out sequences, {int((probe['labels'] >= 0).sum())} tokens")

    callback = POLCACallback(
        store=store,
        probe_data=batches(probe, 64),
        hessian_data=batches(data["hessian"], 128, keys=("input_ids",)),
        token_labels=token_labels,
        snapshot_every=args.snapshot_every,
        basis_every=args.basis_every,
        k=args.k,
        max_basis=args.max_basis,
        order=args.order,
        engine=args.engine,
        seed=args.seed,
        decode=lambda sequence, position: decode(tokenizer, probe, sequence, position),
        decode_target=tokenizer.word,
        # the LCA baseline is appendix G's arithmetic comparison; here it would double the time after fit
        lca_directions=0,
    )
    if args.no_wandb:
        logger = False
    else:
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(project=args.wandb_project, save_dir=str(out), offline=not args.online,
                             config=vars(args))
    model = TinyCausalLM(len(tokenizer), args.seq_len, args.d_model, args.n_layers, args.n_heads, lr=args.lr)
    trainer = L.Trainer(  # one epoch of exactly `steps` batches: the progress bar counts steps
        max_steps=args.steps, max_epochs=1, callbacks=[callback], logger=logger, default_root_dir=out,
        accelerator="auto", devices=1, log_every_n_steps=max(1, min(25, args.steps // 4)), enable_checkpointing=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, DataLoader(train, batch_size=None, shuffle=False))
    total = time.perf_counter() - start
    if logger:
        import wandb

        wandb.finish()
    summarize(store, callback, tokenizer, probe, total)
    return store


def summarize(store: Path, callback: POLCACallback, tokenizer: WordTokenizer, probe: dict, total: float,
              top: int = 5) -> None:
    """What the run found, printed: sizes, time, coverage, and per kept vector its clusters
    with their most common targets and the context nearest each medoid."""
    ds = open_store(store)
    t = callback.tracker.timings
    print(f"\nPOLCA store: {store}  ({ds.sizes['snapshot']} snapshots, {ds.sizes['basis']} basis vectors, "
          f"{ds.sizes['token']} probe tokens, order {ds.attrs['order']!r})")
    print(f"fit took {total:.0f} s, of which the callback: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(t.items())))
    loss = ds["loss"].values
    print(f"probe loss per token: {loss[0].mean():.3f} at step 0, {loss[-1].mean():.3f} at step "
          f"{int(ds['step'].values[-1])} (lowest {loss.mean(1).min():.3f})")
    real = loss[-1] - loss[0]  # [token]
    for name in ("polca", "polca_first"):
        alloc = ds[name].sum(("interval", "basis")).values
        print(f"coverage of {name:<11}: allocated {alloc.mean():+.4f} of a real mean loss change "
              f"{real.mean():+.4f} per token (ratio {alloc.sum() / real.sum():.2f})")
    if "cluster" not in ds:
        return
    from polca_lightning.report import cluster_targets_table, kept_units, medoid_contexts_table

    kept = kept_units(ds)
    tau = ds["cluster"].attrs.get("analysis_tau", float("nan"))
    rule = ds["cluster"].attrs.get("analysis_tau_rule", "")
    paper = ds["cluster"].attrs.get("analysis_tau_paper", float("nan"))
    print(f"kept vectors: {kept} of {ds.sizes['basis']}; tau = step {tau:g} ({rule}; the paper's rule, 10% of "
          f"the run, gives {paper:g}); per cluster: size, onset of its mean curve (*: a hidden breakthrough, "
          "the onset is after tau), the most common targets with their share of the cluster (and of all probe "
          "tokens)")
    targets = cluster_targets_table(ds, top=top, decode_target=tokenizer.word)
    contexts = medoid_contexts_table(ds, k=1, decode=lambda s, p: decode(tokenizer, probe, s, p))
    tc = {name: i for i, name in enumerate(targets.columns)}
    medoid = {(r[0], r[1]): r[-1] for r in contexts.rows}
    onset, hidden = ds["cluster_onset"].values, ds["hidden"].values.astype(bool)
    for u in kept:
        rows = [r for r in targets.rows if r[tc["vector"]] == u]
        clusters = sorted({r[tc["cluster"]] for r in rows})
        print(f"vector {u} (eigenvalue {float(ds['eigenvalue'].values[u]):.3g}, joined at step "
              f"{int(ds['basis_step'].values[u])}): {len(clusters)} clusters, "
              f"{int((ds['cluster'].values[u] == -1).sum())} outliers")
        for c in clusters:
            mine = [r for r in rows if r[tc["cluster"]] == c]
            tops = ", ".join(f"{r[tc['text']]!r} {r[tc['share']]:.0%} (all {r[tc['base_share']]:.0%})"
                             for r in mine)
            mark = "*" if hidden[u, c] else " "
            print(f"  c{c} n={mine[0][tc['cluster_size']]:<4} onset {onset[u, c]:>5g}{mark} {tops}")
            print(f"      nearest the medoid: {medoid.get((u, c), '')}")


if __name__ == "__main__":
    os.environ.setdefault("WANDB_SILENT", "true")
    main()

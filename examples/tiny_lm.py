"""Influence on a language model: a tiny character-level causal transformer trained on a local text file, then the
training lines that most helped the model on two query lines (EK-FAC through the Python API).

    python examples/tiny_lm.py [TEXT_FILE] [--seconds 20]      # default: the repository's README.md

Each non-empty line of the file is one sequence (cut to ``--length`` characters, right-padded, ``attention_mask`` 0
on the padding), tokenised by a dict of its characters. A batch is what a HuggingFace tokenizer gives:
``{"input_ids", "attention_mask"}``; :class:`~influencelab.tasks.LanguageModelingTask` sums each sequence's
next-token cross-entropies (padding ignored) and calls the model with ``input_ids=``/``attention_mask=``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from influencelab import Attributor
from influencelab.tasks import LanguageModelingTask


class CharLM(nn.Module):
    """One causal self-attention block (q/k/v/out as ``nn.Linear``, so EK-FAC tracks them) and a feed-forward block."""

    def __init__(self, vocab: int, length: int, d: int = 32):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        t = input_ids.shape[1]
        h = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        x = self.norm1(h)
        att = self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(x.shape[-1])
        allowed = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, :].bool()
        h = h + self.o(torch.softmax(att.masked_fill(~allowed, -1e9), -1) @ self.v(x))
        h = h + self.ff2(torch.relu(self.ff1(self.norm2(h))))
        return self.head(self.norm3(h))


class Lines(Dataset):
    """One ``{"input_ids", "attention_mask"}`` dict per line of text."""

    def __init__(self, lines: list[str], vocab: dict[str, int], length: int):
        self.lines = lines
        self.ids = torch.zeros(len(lines), length, dtype=torch.long)
        self.mask = torch.zeros(len(lines), length, dtype=torch.long)
        for i, line in enumerate(lines):
            codes = [vocab[c] for c in line[:length]]
            self.ids[i, :len(codes)], self.mask[i, :len(codes)] = torch.tensor(codes), 1

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", default=str(Path(__file__).resolve().parents[1] / "README.md"))
    parser.add_argument("--seconds", type=float, default=20.0, help="training time on the CPU")
    parser.add_argument("--length", type=int, default=48, help="characters per sequence")
    parser.add_argument("--max-lines", type=int, default=600)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # ops this small run faster on one thread (more only spin, on a busy CPU badly)

    text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) >= 8][: args.max_lines + 2]
    vocab = {c: i for i, c in enumerate(sorted(set("".join(lines))))}
    train, queries = Lines(lines[2:], vocab, args.length), Lines(lines[:2], vocab, args.length)
    model, task = CharLM(len(vocab), args.length), LanguageModelingTask()

    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:  # plain minibatch training on the task's mean token loss
        idx = torch.randint(0, len(train), (32,))
        batch = {"input_ids": train.ids[idx], "attention_mask": train.mask[idx]}
        loss = task.mean_loss(task.forward(model, task.inputs(batch)), task.targets(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    print(f"trained {step} steps on {len(train)} lines of {args.text}: token loss {loss.item():.3f}")

    attr = Attributor(model.eval(), task=LanguageModelingTask(), solver="ekfac", damping="auto")
    scores = attr.fit(train).pairwise(queries)[0]  # [n_query, n_train], positive = helpful
    for q, row in zip(queries.lines, scores, strict=True):
        print(f"\nquery: {q[:args.length]!r}")
        for j in row.argsort(descending=True)[:3].tolist():
            print(f"  {float(row[j]):+10.3g}  {train.lines[j][:args.length]!r}")


if __name__ == "__main__":
    main()

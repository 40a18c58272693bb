"""Scoring a model on text without generating: perplexity and multiple-choice accuracy.

  perplexity     windows over a token array (non-overlapping, or HF's sliding-window recipe) -> summed nats
  utf8_bytes     the bytes the tokens decode to, for bits per byte
  multiple choice  C-Eval / CMMLU style items, each option scored by its log-likelihood after the question

eval.py (ppl, mc) and quantize.py (perplexity before / after) call these.
"""
import json

import numpy as np
import torch
import torch.nn.functional as F

import cli


# ----------------------------------------------------------------------------- perplexity

def eval_windows(n_tokens, seq_len, stride=None):
    """(begin, end, first_scored) windows over tokens[0:n_tokens]; position t in a window is scored when
    it predicts token t+1 >= first_scored.
    - no stride: non-overlapping windows of seq_len; the first token of each window has no context and
      is not predicted (exactly what `model(window, labels=window).loss` of transformers averages over).
    - stride S: HF's sliding-window recipe. Each window ends S tokens after the previous one and only its
      new tokens are scored, each with up to seq_len - 1 tokens of context; every token but the first
      is scored exactly once."""
    if stride is None:
        return [(b, min(b + seq_len, n_tokens), b + 1) for b in range(0, n_tokens - 1, seq_len)
                if min(b + seq_len, n_tokens) - b >= 2]
    windows, prev_end = [], 1  # token 0 is never predicted
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        windows.append((begin, end, prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@torch.no_grad()
def perplexity(model, tokens, seq_len, stride=None, batch_size=1, device="cpu", progress=False):
    """Sum of the negative log-likelihoods (nats) and the number of scored tokens over `tokens`."""
    windows = eval_windows(len(tokens), seq_len, stride)
    nll, n_scored = 0.0, 0
    i = 0
    bar = cli.progress(total=len(windows), desc="ppl", disable=not progress)
    while i < len(windows):
        # a batch is consecutive windows of one length (all but the last one or two are)
        length = windows[i][1] - windows[i][0]
        batch = [windows[i]]
        while (len(batch) < batch_size and i + len(batch) < len(windows)
               and windows[i + len(batch)][1] - windows[i + len(batch)][0] == length):
            batch.append(windows[i + len(batch)])
        x = torch.from_numpy(np.stack([np.asarray(tokens[b:e], dtype=np.int64) for b, e, _ in batch])).to(device)
        # targets[t] = x[t+1] where token b+t+1 is scored, else -100 (ignored); the last position has no target
        targets = torch.full_like(x, -100)
        for row, (b, e, first) in enumerate(batch):
            s = max(first - b - 1, 0)
            targets[row, s:e - b - 1] = x[row, s + 1:e - b]
        nll += model(x, targets=targets, reduction="sum").item()
        n_scored += int((targets != -100).sum())
        i += len(batch)
        bar.update(len(batch))
    bar.close()
    return nll, n_scored


def utf8_bytes(tokenizer, tokens, chunk=1 << 20) -> int:
    """Bytes of the text the tokens decode to (decoded in chunks: a huge val set never sits in one string)."""
    return sum(len(tokenizer.decode(tokens[i:i + chunk]).encode("utf-8")) for i in range(0, len(tokens), chunk))


# ----------------------------------------------------------------------------- multiple choice

def read_mc(path):
    """C-Eval / CMMLU style items: {"question", "A".."D" or "options": [...], "answer": "B"}, as a JSON list
    or JSON lines. Returns (question, options, answer index) triples."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        items = (json.loads(text) if text.lstrip().startswith("[")
                 else [json.loads(line) for line in text.splitlines() if line.strip()])
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--data {path}: {e}")
    out = []
    for n, it in enumerate(items):
        options = it.get("options") or [it[k] for k in "ABCDEFGH" if k in it]
        answer = it.get("answer")
        idx = "ABCDEFGH".find(answer) if isinstance(answer, str) and len(answer) == 1 else answer
        if "question" not in it or len(options) < 2 or not isinstance(idx, int) or not 0 <= idx < len(options):
            raise SystemExit(f"--data {path}: item {n} needs question, >= 2 options and an answer letter/index")
        out.append((it["question"], options, idx))
    return out


@torch.no_grad()
def option_logliks(model, tokenizer, question, options, bos=True):
    """sum log p(option tokens | question) for each option (one batch, right-padded)."""
    device = next(model.parameters()).device
    context = ([tokenizer.bos_id] if bos else []) + tokenizer.encode(question)
    conts = [tokenizer.encode(o) for o in options]
    rows = [context + c for c in conts]
    T = max(map(len, rows))
    x = torch.full((len(rows), T), tokenizer.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.tensor(r)
    logp = F.log_softmax(model(x.to(device)).float(), dim=-1)
    scores = []
    for i, c in enumerate(conts):
        positions = torch.arange(len(context) - 1, len(context) - 1 + len(c), device=device)
        scores.append(logp[i, positions, torch.tensor(c, device=device)].sum().item())
    return scores


def mc_accuracy(model, tokenizer, items, prompt_format="{question}\n答案：", bos=True):
    """acc: the option with the highest log-likelihood is the answer; acc_norm: per UTF-8 byte of the option,
    which does not favour short options (lm-evaluation-harness' two figures)."""
    hits = hits_norm = 0
    for question, options, answer in cli.progress(items, desc="mc", disable=len(items) < 50):
        ll = option_logliks(model, tokenizer, prompt_format.format(question=question), options, bos)
        hits += int(np.argmax(ll) == answer)
        hits_norm += int(np.argmax([s / max(len(o.encode("utf-8")), 1) for s, o in zip(ll, options)]) == answer)
    return hits / len(items), hits_norm / len(items)

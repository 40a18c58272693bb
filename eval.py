"""Judge a checkpoint: perplexity, text generation, chat and multiple-choice accuracy.

    python eval.py ppl      --model out/pretrain --data data/x_val.bin [--stride 256] [--max_seq_len 2048 \
                            --rope_scaling '{"rope_type":"yarn","factor":2}']
    python eval.py generate --model out/sft --prompt "Once upon a time" [--temperature 0.8 --top_p 0.9 | --num_beams 4]
    python eval.py chat     --model out/sft [--adapter out/sft_lora] [--chat_inputs turns.txt]
    python eval.py mc       --model out/sft --data ceval_like.json

Every checkpoint the repo writes loads here: a pretrain or SFT folder, a GPTQ folder (through
Transformer.from_pretrained), or a base folder plus a LoRA adapter (`--adapter`, merged by peft).

Decoding runs on model.py's static KV cache. The one-token step has fixed shapes (the cache slot is
a tensor), so on a GPU `--compile` records it as a CUDA graph (gpt-fast style): one graph replay per token
instead of hundreds of kernel launches. The step inside is fast_decode.py's Triton kernels for a Llama,
or the model's forward under torch.compile(mode="reduce-overhead"). On the CPU the same loop runs
eagerly. Read top to bottom:

  loading        model + tokenizer (+ LoRA adapter merged)
  perplexity     windows over a .bin, nats -> ppl and bits per byte
  logits         repetition penalty and bad words (HF semantics); temperature/top-k/top-p live in model.sample
  decoding       Decoder (cache + compiled step), sampling/greedy loop, beam search, stop strings, streaming
  chat / mc      the REPL on dataset_sft.render_chat; option log-likelihood scoring
  CLI
"""
import argparse
import itertools
import json
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

import fast_decode
from data_process import check_token_file, load_token_file
from dataset_sft import render_chat
from model import ATTN_IMPLS, Transformer, sample
from tokenizer import Tokenizer


# ----------------------------------------------------------------------------- loading

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path, adapter=None, device="cpu", dtype=torch.float32, **overrides):
    """Transformer.from_pretrained(path) (our folder, an HF folder, or a GPTQ folder), optionally with a
    LoRA adapter folder merged into the weights: W' = W + (alpha/r) * B @ A, so decoding pays nothing."""
    model = Transformer.from_pretrained(path, dtype=dtype, **overrides)
    if adapter:
        from peft import PeftModel
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise SystemExit(f"--adapter {adapter}: no adapter_config.json (not a peft adapter folder)")
        # peft wraps any nn.Module whose submodule names match the adapter's target_modules (q_proj, ...)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.to(device).eval()


def load_tokenizer(model_path, adapter=None, tokenizer=None) -> Tokenizer:
    """--tokenizer, else the one saved beside the adapter, else the one in the model folder."""
    if tokenizer:
        return Tokenizer(tokenizer)
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise SystemExit(f"--model {model_path}: no config.json (not a checkpoint folder)")
    for folder in (adapter, model_path):
        if folder and any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.model", "tokenizer.json")):
            return Tokenizer(folder)
    raise SystemExit(f"{model_path}: no tokenizer.model / tokenizer.json in the folder; pass --tokenizer")


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
    bar = tqdm(total=len(windows), desc="ppl", disable=not progress)
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


# ----------------------------------------------------------------------------- logits processing

def apply_repetition_penalty(logits, history, penalty, history_mask=None):
    """CTRL's penalty (Keskar et al. 2019), as transformers' RepetitionPenaltyLogitsProcessor: a token seen in
    `history` has its logit l divided by the penalty if l > 0 and multiplied by it if l < 0 (so it always
    gets less likely for penalty > 1), once however often it occurred. Padding (history_mask 0) is not
    history."""
    seen = torch.zeros_like(logits, dtype=torch.bool)
    if history_mask is not None:
        history = history.masked_fill(~history_mask.bool(), 0)
        seen.scatter_(1, history, history_mask.bool())
    else:
        seen.scatter_(1, history, True)
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_bad_words(logits, history, bad_words_ids):
    """A bad word is a token sequence w: its last token is banned (-inf) whenever the context ends with
    w[:-1] (always for a one-token word), so it can never be completed (HF NoBadWordsLogitsProcessor)."""
    logits = logits.clone()
    for word in bad_words_ids:
        prefix = word[:-1]
        if len(prefix) > history.shape[1]:
            continue
        if prefix:
            rows = (history[:, -len(prefix):] == torch.tensor(prefix, device=history.device)).all(dim=1)
        else:
            rows = torch.ones(history.shape[0], dtype=torch.bool, device=history.device)
        logits[rows, word[-1]] = float("-inf")
    return logits


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0  # beam search: a finished beam scores sum(log p) / generated_len ** length_penalty
    early_stopping: bool | str = False  # beam search: True | False | "never", as transformers
    stop_ids: list = field(default_factory=list)
    stop_strings: list = field(default_factory=list)
    bad_words_ids: list = field(default_factory=list)


def process_logits(logits, history, history_mask, cfg: GenerationConfig):
    """The penalties that depend on what came before (applied before temperature / top-k / top-p)."""
    if cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, history, cfg.repetition_penalty, history_mask)
    if cfg.bad_words_ids:
        logits = apply_bad_words(logits, history, cfg.bad_words_ids)
    return logits


# ----------------------------------------------------------------------------- decoding

def left_pad(prompts, pad_id):
    """list of id lists -> (B, T) ids right-aligned (padding on the left) and the (B, T) 1/0 attention mask.
    Left padding puts every row's last prompt token in the same column, so one decode step serves all rows."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids, mask


GREEDY_IN_GRAPH = True  # bench.py decode's ours_pick_outside_graph entry turns it off


class Decoder:
    """Owns the model's static KV cache and the one-token step. With compile=True (CUDA only) the step runs
    as a CUDA graph, recorded once and replayed each token, so that the GPU does not wait on Python between
    its hundreds of small kernels (gpt-fast style). The graph needs fixed shapes and fixed addresses: the
    cache slot comes in as a tensor, the cache length is rounded up to a bucket (chats of similar length
    share one graph), and the cache tensors are updated in place. The step itself is either
      - fast_decode's Triton kernels (five per layer), for a Llama with plain weights at batch <= 4,
        recorded with torch.cuda.graph; or
      - the model's forward under torch.compile(mode="reduce-overhead"): inductor fuses the small ops and
        records the graph itself (any model, any batch size)."""

    def __init__(self, model, compile=False, bucket=256, compile_prefill=True, kernels=True, prefill_graphs=True):
        self.model, self.bucket = model, bucket
        self.compiled = compile and next(model.parameters()).is_cuda
        self.kernels = self.compiled and kernels and fast_decode.supported(model)
        self._graphs = {}  # the kernels' step recorded, per greedy True/False (_kernels_graph)
        if self.compiled:
            # as gpt-fast: tune the block sizes of inductor's kernels, most of which read a weight matrix
            # once for a single token (memory-bound); measured ~1.8x faster decode on an H100 (350m preset)
            torch._inductor.config.coordinate_descent_tuning = True
        self._compiled_step = (torch.compile(self._step, mode="reduce-overhead", fullgraph=True, dynamic=False)
                               if self.compiled else None)
        # the prompt pass is compiled too: prompt lengths vary, so after the second length dynamo compiles one
        # graph with a symbolic length. Eager, the ~270 small kernels of a forward cost ~25 ms of Python
        # launches (350m preset), a tenth of the time to generate 256 tokens; compiled, still 5-8 ms for a
        # 16-token prompt. With prefill_graphs each prompt shape is also recorded as a CUDA graph the second
        # time it is seen (inductor's cudagraph trees: one compiled graph, one recording per shape).
        mode = "reduce-overhead" if prefill_graphs else None
        self._compiled_prefill = (torch.compile(self._prefill, mode=mode) if self.compiled and compile_prefill
                                  else None)
        self.cache = None

    def _step(self, tokens, cache, cache_pos):
        # one query against the cache is a matrix-vector product: plain math attention lets inductor fuse it
        # with its neighbours, where a fused-attention library call (cuDNN / efficient) costs more than it does
        with sdpa_kernel(SDPBackend.MATH):
            return self.model(tokens, cache=cache, cache_pos=cache_pos)[:, -1]

    def step(self, tokens, cache, cache_pos):
        """Logits (B, vocab) of one new token per row, written to cache slot cache_pos (a 1-element tensor).
        With compile=True they live in the graph's output buffer, overwritten by the next step."""
        if not self.compiled:
            return self._step(tokens, cache, cache_pos)
        if self.kernels and tokens.shape[0] <= fast_decode.MAX_BATCH:
            return self._kernels_step(tokens, cache, cache_pos)
        # a new replay overwrites the previous step's output buffers: tell the graph manager that the
        # caller is done with them (it has already sampled from those logits)
        torch.compiler.cudagraph_mark_step_begin()
        return self._compiled_step(tokens, cache, cache_pos)

    def _kernels_step(self, tokens, cache, cache_pos):
        graph, (tokens_in, pos_in), logits = self._kernels_graph(cache, tokens, cache_pos, greedy=False)
        tokens_in.copy_(tokens)
        pos_in.copy_(cache_pos)
        graph.replay()
        return logits

    def _kernels_graph(self, cache, tokens, cache_pos, greedy):
        """fast_decode's step on this cache recorded as a CUDA graph that reads its token and slot from fixed
        buffers; returns (graph, (token buffer, slot buffer), output). With greedy the pick is recorded too:
        the argmax goes back into the token buffer (the next replay's input) and into picks[slot], and the
        slot moves on, so replays can follow each other with nothing in between; the output is picks.
        Recorded on the first step on a cache (new_cache hands the same one back while the shape fits)."""
        if greedy in self._graphs and self._graphs[greedy][0] is cache:
            return self._graphs[greedy][1:]
        tokens_in, pos_in = tokens.clone(), cache_pos.clone()
        # greedy: the picks by slot, and the argmax kernel's count of rows done
        picks = torch.zeros(cache.max_len, tokens.shape[0], dtype=torch.long, device=tokens.device)
        arrived = torch.zeros(1, dtype=torch.int32, device=tokens.device)

        def step():
            logits = fast_decode.decode_step(self.model, tokens_in, cache, pos_in)
            if not greedy:
                return logits
            fast_decode.argmax(logits, out=tokens_in, record=(picks, pos_in, arrived))
            return picks

        # run the step for real once on a side stream, which compiles the Triton kernels (recording runs
        # nothing). It writes this token's keys and values to its slot: the replay that follows writes the same.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        tokens_in.copy_(tokens)
        pos_in.copy_(cache_pos)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        self._graphs[greedy] = (cache, graph, (tokens_in, pos_in), out)
        return self._graphs[greedy][1:]

    def picks_in_graph(self, batch_size):
        """Whether greedy_steps can run: the step is fast_decode's kernels at this batch size."""
        return GREEDY_IN_GRAPH and self.kernels and batch_size <= fast_decode.MAX_BATCH

    def greedy_steps(self, tokens, cache, slot, n):
        """Greedy decoding's next n steps after `tokens` (B, 1) at cache slot `slot` (an int), each yielded as
        a list of B picked ids. The pick is part of the recorded step (_kernels_graph), so the GPU replays
        step after step; after each replay a side stream copies that step's picks to the host, and the host
        reads them while the next step runs (a stop found there leaves one wasted step at most)."""
        slot_t = torch.tensor([slot], device=tokens.device)
        graph, (tokens_in, pos_in), picks = self._kernels_graph(cache, tokens, slot_t, greedy=True)
        tokens_in.copy_(tokens)
        pos_in.fill_(slot)
        host = torch.empty(picks.shape, dtype=picks.dtype, pin_memory=True)
        copier, copied = torch.cuda.Stream(), []
        for s in range(slot, slot + n):
            graph.replay()
            stepped = torch.cuda.Event()
            stepped.record()
            with torch.cuda.stream(copier):
                copier.wait_event(stepped)
                host[s].copy_(picks[s], non_blocking=True)
                copied.append(torch.cuda.Event())
                copied[-1].record()
            if len(copied) > 1:
                copied[-2].synchronize()
                yield host[s - 1].tolist()
        if copied:
            copied[-1].synchronize()
            yield host[slot + n - 1].tolist()

    def new_cache(self, batch_size, length):
        """A cache of >= length slots, reused (zeroed) when the shape matches: the CUDA graph recorded for
        it stays valid."""
        max_len = min(-(-length // self.bucket) * self.bucket, max(length, self.model.args.max_seq_len))
        c = self.cache
        if c is not None and c.k[0].shape[0] == batch_size and c.max_len == max_len:
            c.valid.zero_()  # stale keys/values behind valid=False are never attended to
            return c
        self.cache = c = self.model.new_cache(batch_size, max_len)
        if self.compiled:
            for t in c.k + c.v + [c.valid]:
                torch._dynamo.mark_static_address(t)
        return c

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask, max_new_tokens):
        """Run the prompts through the model, filling cache slots 0..T-1.
        Returns the last position's logits (B, vocab) and the cache."""
        B, T = input_ids.shape
        cache = self.new_cache(B, T + max_new_tokens)
        pos = torch.arange(T, device=input_ids.device)
        return (self._compiled_prefill or self._prefill)(input_ids, attention_mask, cache, pos), cache

    def _prefill(self, input_ids, attention_mask, cache, pos):
        return self.model(input_ids, attention_mask=attention_mask, cache=cache, cache_pos=pos)[:, -1]


def stop_string_cut(text, stop_strings):
    """Index where the earliest stop string starts in text, or None."""
    hits = [text.find(s) for s in stop_strings if s and s in text]
    return min(hits) if hits else None


class Streamer:
    """Prints a row's new text as it is generated. The text is re-decoded from all new ids each time (a
    token may be half of a UTF-8 character, shown as U+FFFD until the rest arrives), and text that could
    still turn out to be the start of a stop string is held back until it cannot."""

    def __init__(self, tokenizer, stop_strings=(), out=sys.stdout):
        self.tokenizer, self.stop_strings, self.out, self.shown = tokenizer, list(stop_strings), out, 0

    def visible(self, text, final):
        cut = stop_string_cut(text, self.stop_strings)
        if cut is not None:
            return text[:cut]
        if final:
            return text
        text = text.rstrip("\ufffd")
        for s in self.stop_strings:  # hold back a suffix that is a prefix of a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    return text[:-k]
        return text

    def put(self, ids, final=False):
        text = self.visible(self.tokenizer.decode(ids), final)
        if len(text) > self.shown:
            self.out.write(text[self.shown:])
            self.out.flush()
            self.shown = len(text)


def start_copy_to_host(t):
    """Start copying t to the host; returns a function that waits for that copy alone (not for GPU work
    queued after it, as t.tolist() would) and gives t as a list."""
    if not t.is_cuda:
        return t.tolist
    host = t.to("cpu", non_blocking=True)  # into pinned memory, ordered after the kernels that made t
    copied = torch.cuda.Event()
    copied.record()
    return lambda: (copied.synchronize(), host.tolist())[1]


USE_TRITON_ARGMAX = True  # bench.py decode's ours_torch_argmax entry turns it off


def next_tokens(logits, cfg: GenerationConfig):
    """model.sample, with greedy picks on a GPU taken by fast_decode.argmax (faster than torch's on one row)."""
    if cfg.temperature == 0.0 and logits.is_cuda and fast_decode.triton is not None and USE_TRITON_ARGMAX:
        return fast_decode.argmax(logits)
    return sample(logits, cfg.temperature, cfg.top_k, cfg.top_p)


@torch.no_grad()
def generate(decoder, prompts, cfg: GenerationConfig, pad_id, tokenizer=None, streamer=None):
    """Sample (or greedily pick) up to cfg.max_new_tokens for each prompt (a list of id lists), as one
    left-padded batch. A row stops at a stop id (kept in its output) or once its decoded text contains a
    stop string (its text is cut there, its ids end at the token that completed it). Returns the new ids
    of each row. Sampling draws from torch's global generator: seed it for reproducible output."""
    if cfg.num_beams > 1:
        return beam_search(decoder, prompts, cfg, pad_id, tokenizer)
    device = next(decoder.model.parameters()).device
    input_ids, attention_mask = (t.to(device) for t in left_pad(prompts, pad_id))
    B, T = input_ids.shape
    logits, cache = decoder.prefill(input_ids, attention_mask, cfg.max_new_tokens)
    # everything seen so far, for the repetition penalty and bad words; padding marked 0 in history_mask
    history = torch.cat([input_ids, torch.full((B, cfg.max_new_tokens), pad_id, device=device)], dim=1)
    history_mask = torch.cat([attention_mask, torch.ones(B, cfg.max_new_tokens, dtype=torch.long, device=device)], 1)
    keep_history = cfg.repetition_penalty != 1.0 or bool(cfg.bad_words_ids)
    # each small op below is a kernel between two decode steps (~1.5 us each at ~500 us a step on an H100):
    # the ones that only matter with stop ids / strings or penalties are skipped without them
    can_stop = bool(cfg.stop_ids or cfg.stop_strings)
    done_t = torch.zeros(B, dtype=torch.bool, device=device)
    stop_t = torch.tensor(sorted(cfg.stop_ids), dtype=torch.long, device=device)

    def steps(logits):
        # each step's new ids as a host list; the next step is queued on the GPU before a step's ids are read
        # back, so the device keeps working while the host does the bookkeeping of the loop below
        pos = torch.tensor([T], device=device)
        for step in range(cfg.max_new_tokens):
            logits = process_logits(logits, history[:, :T + step], history_mask[:, :T + step], cfg)
            nxt = next_tokens(logits, cfg)
            if can_stop:
                nxt.masked_fill_(done_t, pad_id)  # finished rows only feed padding
                done_t.logical_or_(torch.isin(nxt, stop_t))
            if keep_history:
                history[:, T + step] = nxt
            read_tokens = start_copy_to_host(nxt)
            if step + 1 < cfg.max_new_tokens:
                logits = decoder.step(nxt[:, None], cache, pos)
                pos += 1
            yield read_tokens()

    if cfg.temperature == 0.0 and not keep_history and cfg.max_new_tokens > 0 and decoder.picks_in_graph(B):
        # greedy with fast_decode's kernels: the picks happen inside the recorded step. Finished rows go on
        # feeding their own picks, which nobody reads (rows never see each other)
        first = next_tokens(logits, cfg)
        ids_per_step = itertools.chain([first.tolist()],
                                       decoder.greedy_steps(first[:, None], cache, T, cfg.max_new_tokens - 1))
    else:
        ids_per_step = steps(logits)
    new_ids, done = [[] for _ in range(B)], [False] * B
    for step_ids in ids_per_step:
        for i, tok in enumerate(step_ids):
            if done[i]:
                continue
            new_ids[i].append(tok)
            if tok in cfg.stop_ids:
                done[i] = True
            elif cfg.stop_strings and stop_string_cut(tokenizer.decode(new_ids[i]), cfg.stop_strings) is not None:
                done[i] = done_t[i] = True  # rare: the only host-to-device write in the loop
        if streamer is not None:
            streamer.put(new_ids[0])
        if all(done):
            break
    if streamer is not None:
        streamer.put(new_ids[0], final=True)
    return new_ids


@torch.no_grad()
def beam_search(decoder, prompts, cfg: GenerationConfig, pad_id, tokenizer=None):
    """Beam search with transformers' rules, so the same model gives the same ids:
    - each of the K beams of a prompt expands to V tokens; candidates are ranked by the summed log-prob
      (after the penalties) and the best 2K are looked at, so K live beams remain even if many end;
    - a candidate that ends (stop id, stop string or the length limit) is kept as a finished hypothesis
      only if it ranks in the top K, with score sum(log p) / generated_len ** length_penalty; the best K
      finished hypotheses are kept;
    - the best K candidates that did not end live on; a prompt is done when no live beam can still beat
      its worst finished hypothesis (early_stopping False: judged at the current length; "never": at the
      longest possible length when length_penalty > 0; True: as soon as K hypotheses are finished).
    Returns the new ids of the best hypothesis per prompt."""
    K, stop_ids = cfg.num_beams, set(cfg.stop_ids)
    device = next(decoder.model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, pad_id)
    # every prompt is repeated K times: row b*K + k is beam k of prompt b
    input_ids, attention_mask = (t.repeat_interleave(K, dim=0).to(device) for t in (input_ids, attention_mask))
    B, T = len(prompts), input_ids.shape[1]
    logits, cache = decoder.prefill(input_ids, attention_mask, cfg.max_new_tokens)
    history, history_mask = input_ids, attention_mask
    # all K beams start identical: only beam 0 may expand at first, else the top candidates would be K copies
    running = torch.zeros(B, K, device=device)
    running[:, 1:] = -1e9
    finished = [[] for _ in range(B)]  # per prompt: (score, new ids), best first, at most K
    done = [False] * B
    pos = torch.tensor([T], device=device)
    for step in range(cfg.max_new_tokens):
        gen_len = step + 1  # tokens generated once this step's token is appended
        logprobs = process_logits(F.log_softmax(logits, dim=-1), history, history_mask, cfg)
        V = logprobs.shape[-1]
        scores = (logprobs.view(B, K, V) + running[:, :, None]).view(B, K * V)
        top_scores, top_idx = scores.topk(2 * K, dim=1)
        top_beam, top_token = (top_idx // V).tolist(), (top_idx % V).tolist()
        top_scores = top_scores.tolist()
        new_ids_rows = history[:, T:].tolist()
        keep_rows, keep_tokens, keep_scores = [], [], []
        for b in range(B):
            live = []  # (score, beam, token) of candidates that go on
            ended = []  # ranks < K that ended: candidates for finished
            for rank in range(2 * K):
                s, beam, tok = top_scores[b][rank], top_beam[b][rank], top_token[b][rank]
                ids = new_ids_rows[b * K + beam] + [tok]
                hit = (tok in stop_ids or gen_len == cfg.max_new_tokens or
                       (cfg.stop_strings and stop_string_cut(tokenizer.decode(ids), cfg.stop_strings) is not None))
                if hit and rank < K:
                    ended.append((s / gen_len ** cfg.length_penalty, ids))
                # an ended candidate can only go on (as a dead beam) if fewer than K others do
                live.append((s - 1e9 if hit else s, beam, tok))
            live = sorted(live, key=lambda c: -c[0])[:K]
            full = len(finished[b]) == K and cfg.early_stopping is True
            if not done[b] and not full and ended:
                finished[b] = sorted(finished[b] + ended, key=lambda h: -h[0])[:K]
            keep_rows += [b * K + beam for _, beam, _ in live]
            keep_tokens += [tok for _, _, tok in live]
            keep_scores.append([s for s, _, _ in live])
            # can a live beam still beat the worst finished one? Its sum of log-probs only falls as it grows,
            # so its best score is at the current length (or at the longest one when length_penalty > 0
            # rewards length and early_stopping is "never")
            if len(finished[b]) == K and not done[b]:
                best_len = cfg.max_new_tokens if (cfg.early_stopping == "never" and cfg.length_penalty > 0) else gen_len
                done[b] = cfg.early_stopping is True or live[0][0] / best_len ** cfg.length_penalty <= finished[b][-1][0]
        if all(done) or gen_len == cfg.max_new_tokens:
            break
        # the K survivors of each prompt become rows b*K..b*K+K-1: reorder the cache rows to their parents
        rows = torch.tensor(keep_rows, device=device)
        for t in cache.k + cache.v + [cache.valid]:
            t.copy_(t.index_select(0, rows))
        tokens = torch.tensor(keep_tokens, device=device)
        history = torch.cat([history.index_select(0, rows), tokens[:, None]], dim=1)
        history_mask = torch.cat([history_mask.index_select(0, rows), torch.ones_like(tokens)[:, None]], dim=1)
        running = torch.tensor(keep_scores, device=device)
        logits = decoder.step(tokens[:, None], cache, pos)
        pos += 1
    return [hyps[0][1] for hyps in finished]


def finish_text(tokenizer, ids, cfg: GenerationConfig):
    """The text of new ids: cut at the first stop string, without a trailing stop token."""
    if ids and ids[-1] in cfg.stop_ids:
        ids = ids[:-1]
    text = tokenizer.decode(ids)
    cut = stop_string_cut(text, cfg.stop_strings)
    return text if cut is None else text[:cut]


def request_seed(seed):
    """Seed torch's generator for one request: the given seed, or a fresh random one (printed so the
    output can be reproduced with --seed)."""
    seed = secrets.randbits(31) if seed is None else seed
    torch.manual_seed(seed)
    return seed


# ----------------------------------------------------------------------------- chat

def chat(decoder, tokenizer, cfg, lines, context=None, system=None, interactive=False, seed=None, out=sys.stdout):
    """Multi-turn chat over THE template (dataset_sft.render_chat). Each user line is a turn; the reply
    stops at <|end|>. "/reset" forgets the conversation, "/exit" ends. Old exchanges are dropped when the
    conversation no longer fits `context` tokens. Interactive: the reply streams; otherwise every turn is
    one line (`user: ...`, `assistant: "json string"`) for scripts."""
    end_id = tokenizer.token_id("<|end|>")
    cfg.stop_ids = sorted(set(cfg.stop_ids) | {i for i in (end_id, tokenizer.eos_id) if i is not None})
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    max_prompt = (context or decoder.model.args.max_seq_len) - cfg.max_new_tokens
    for line in lines:
        line = line.rstrip("\n")
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            messages = list(start)
            print("reset: ok", file=out)
            continue
        if not line.strip():
            continue
        if not interactive:
            print(f"user: {line}", file=out)
        messages.append({"role": "user", "content": line})
        ids, _ = render_chat(tokenizer, messages, add_generation_prompt=True)
        while len(ids) > max_prompt and len(messages) > len(start) + 1:
            messages = start + messages[len(start) + 2:]  # drop the oldest user/assistant exchange
            ids, _ = render_chat(tokenizer, messages, add_generation_prompt=True)
        if cfg.temperature > 0:
            print(f"seed: {request_seed(seed)}", file=out)
        out.write("assistant: ")
        streamer = Streamer(tokenizer, cfg.stop_strings, out) if interactive and cfg.num_beams == 1 else None
        new = generate(decoder, [ids], cfg, tokenizer.pad_id, tokenizer, streamer)[0]
        reply = finish_text(tokenizer, new, cfg)
        out.write("\n" if streamer else json.dumps(reply, ensure_ascii=False) + "\n")
        out.flush()
        messages.append({"role": "assistant", "content": reply})


# ----------------------------------------------------------------------------- multiple choice

def read_mc(path):
    """C-Eval / CMMLU style items: {"question", "A".."D" or "options": [...], "answer": "B"}, as a JSON list
    or JSON lines. Returns (question, options, answer index) triples."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        items = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
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
    for question, options, answer in tqdm(items, desc="mc", disable=len(items) < 50):
        ll = option_logliks(model, tokenizer, prompt_format.format(question=question), options, bos)
        hits += int(np.argmax(ll) == answer)
        hits_norm += int(np.argmax([s / max(len(o.encode("utf-8")), 1) for s, o in zip(ll, options)]) == answer)
    return hits / len(items), hits_norm / len(items)


# ----------------------------------------------------------------------------- CLI

def parse_json_flag(flag, value):
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise SystemExit(f"{flag}: not valid JSON ({e})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="checkpoint folder (pretrain / SFT / GPTQ / HF Llama or NeoX)")
    common.add_argument("--adapter", help="LoRA adapter folder (peft) to merge into --model")
    common.add_argument("--tokenizer", help="tokenizer file or folder (default: the one in --adapter or --model)")
    common.add_argument("--device", default=default_device(), help="cpu | cuda | cuda:N")
    common.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="weights dtype; auto: bfloat16 on a GPU, float32 on the CPU")
    common.add_argument("--max_seq_len", type=int,
                        help="context to use (ppl window, chat history) instead of the trained one: length extrapolation")
    common.add_argument("--rope_scaling", help='override the rope scaling, JSON, e.g. \'{"rope_type":"yarn","factor":2}\' '
                        '(scaled relative to the trained length)')
    common.add_argument("--attn_impl", help=f"override the attention backend ({' | '.join(ATTN_IMPLS)})")
    common.add_argument("--no_bos", action="store_true", help="do not start prompts with the BOS token")
    gen = argparse.ArgumentParser(add_help=False)
    gen.add_argument("--max_new_tokens", type=int, default=128, help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample from softmax(logits / T)")
    gen.add_argument("--top_k", type=int, help="sample only among the k most likely tokens")
    gen.add_argument("--top_p", type=float, help="sample only among the smallest set of tokens with probability >= p")
    gen.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages tokens already seen (CTRL)")
    gen.add_argument("--num_beams", type=int, default=1, help="> 1: beam search with this many beams")
    gen.add_argument("--length_penalty", type=float, default=1.0, help="beam search: score = logprob / len ** this")
    gen.add_argument("--early_stopping", choices=["false", "true", "never"], default="false",
                     help="beam search stop rule, as transformers")
    gen.add_argument("--stop_ids", default="", help="comma-separated token ids that end a sequence (EOS always does)")
    gen.add_argument("--stop_strings", default="[]", help='JSON list of strings that end a sequence, e.g. \'["\\n\\n"]\'')
    gen.add_argument("--bad_words", default="[]", help="JSON list of strings that may never be generated")
    gen.add_argument("--seed", type=int, help="sampling seed (default: a fresh random one per request, printed)")
    gen.add_argument("--compile", action="store_true",
                     help="CUDA: run the decode step as a CUDA graph (fast_decode.py's Triton kernels for a Llama at "
                          "batch <= 4, else torch.compile'd) and compile the prompt pass, recorded as a CUDA "
                          "graph per prompt shape (ignored on the CPU)")

    pp = sub.add_parser("ppl", parents=[common], help="perplexity and bits per byte on a .bin token file")
    pp.add_argument("--data", required=True, help="token file X.bin (with its X.json) from data_process.py")
    pp.add_argument("--stride", type=int, help="sliding windows that advance by this many tokens (default: none overlap)")
    pp.add_argument("--batch_size", type=int, default=8, help="windows per forward")
    pp.add_argument("--max_tokens", type=int, help="evaluate only the first N tokens of the file")

    pg = sub.add_parser("generate", parents=[common, gen], help="continue a prompt (or a file of prompts, one per line)")
    src = pg.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt_file", help="a file with one prompt per line, run as one left-padded batch")

    pc = sub.add_parser("chat", parents=[common, gen], help="multi-turn chat (/reset, /exit)")
    pc.add_argument("--system", help="system message opening the conversation")
    pc.add_argument("--chat_inputs", help="file of user turns, one per line (default: stdin, interactive on a tty)")

    pm = sub.add_parser("mc", parents=[common], help="multiple-choice accuracy by option log-likelihood")
    pm.add_argument("--data", required=True, help="JSON list / JSON lines of {question, A..D | options, answer}")
    pm.add_argument("--prompt_format", default="{question}\n答案：", help="how the question is shown before an option")
    args = p.parse_args(argv)

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    # the model keeps its trained max_seq_len: RoPE scalings measure extension against it (YaRN's
    # original length, dynamic NTK's threshold); --max_seq_len only sets how much context is used here
    overrides = {}
    if args.rope_scaling:
        overrides["rope_scaling"] = parse_json_flag("--rope_scaling", args.rope_scaling)
    if args.attn_impl:
        overrides["attn_impl"] = args.attn_impl
    tokenizer = load_tokenizer(args.model, args.adapter, args.tokenizer)
    model = load_model(args.model, args.adapter, device, dtype, **overrides)
    bos = [] if args.no_bos else [tokenizer.bos_id]
    context = args.max_seq_len or model.args.max_seq_len

    if args.cmd == "ppl":
        tokens, meta = load_token_file(args.data)
        check_token_file(meta, tokenizer.vocab_size, tokenizer.file_hash, path=args.data)
        tokens = tokens[:args.max_tokens] if args.max_tokens else tokens
        if len(tokens) < 2:
            raise SystemExit(f"--data {args.data}: fewer than 2 tokens, nothing to score")
        t0 = time.time()
        nll, n = perplexity(model, tokens, context, args.stride, args.batch_size, device, progress=True)
        # bits per byte = bits per token * tokens per byte: comparable across tokenizers
        nll_per_token = nll / n
        print(f"ppl: {math.exp(nll_per_token):.4f}")
        print(f"bpb: {nll_per_token / math.log(2) * len(tokens) / utf8_bytes(tokenizer, tokens):.4f}")
        print(f"tokens: {n}")
        print(f"seq_len: {context}")
        print(f"seconds: {time.time() - t0:.1f}")
        return

    if args.cmd == "mc":
        acc, acc_norm = mc_accuracy(model, tokenizer, read_mc(args.data), args.prompt_format, bos=not args.no_bos)
        print(f"acc: {acc:.4f}")
        print(f"acc_norm: {acc_norm:.4f}")
        return

    try:
        stop_ids = [int(s) for s in args.stop_ids.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--stop_ids {args.stop_ids}: expected comma-separated integers")
    stop_strings = parse_json_flag("--stop_strings", args.stop_strings)
    bad_words = parse_json_flag("--bad_words", args.bad_words)
    if not all(isinstance(s, str) for s in stop_strings + bad_words):
        raise SystemExit("--stop_strings / --bad_words: expected a JSON list of strings")
    if args.temperature < 0 or args.num_beams < 1 or args.max_new_tokens < 1:
        raise SystemExit("--temperature must be >= 0, --num_beams and --max_new_tokens >= 1")
    if args.num_beams > 1 and args.temperature > 0:
        raise SystemExit("--num_beams > 1 with --temperature > 0: beam search here is deterministic; pick one")
    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, num_beams=args.num_beams, length_penalty=args.length_penalty,
        early_stopping={"false": False, "true": True, "never": "never"}[args.early_stopping],
        stop_ids=[tokenizer.eos_id] + stop_ids, stop_strings=stop_strings,
        bad_words_ids=[tokenizer.encode(w) for w in bad_words if w])
    decoder = Decoder(model, compile=args.compile)
    if args.compile and not decoder.compiled:
        print("compile: off (needs CUDA; decoding eagerly)")

    if args.cmd == "chat":
        if args.chat_inputs:
            with open(args.chat_inputs, encoding="utf-8") as f:
                lines = f.readlines()
            interactive = False
        else:
            interactive = sys.stdin.isatty()
            lines = iter(lambda: input("user: "), None) if interactive else sys.stdin
        try:
            chat(decoder, tokenizer, cfg, lines, context, args.system, interactive, args.seed)
        except (EOFError, KeyboardInterrupt):
            print()
        return

    if args.prompt is not None:
        texts = [args.prompt]
    else:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                texts = [l.rstrip("\n") for l in f if l.strip()]
        except OSError as e:
            raise SystemExit(f"--prompt_file: {e}")
        if not texts:
            raise SystemExit(f"--prompt_file {args.prompt_file}: no prompts (one per non-empty line)")
    prompts = [bos + ids for ids in tokenizer.encode_batch(texts)]
    if max(map(len, prompts)) + cfg.max_new_tokens > context:
        print(f"warning: prompt + max_new_tokens exceeds the context of {context} tokens", file=sys.stderr)
    seed = request_seed(args.seed)
    print(f"seed: {seed}")
    stream = len(prompts) == 1 and cfg.num_beams == 1
    if stream:
        sys.stdout.write(texts[0])
    t0 = time.time()
    new = generate(decoder, prompts, cfg, tokenizer.pad_id, tokenizer,
                   Streamer(tokenizer, cfg.stop_strings) if stream else None)
    dt = time.time() - t0
    if stream:
        print()
    else:
        for i, ids in enumerate(new):
            print(f"output_{i}: {json.dumps(texts[i] + finish_text(tokenizer, ids, cfg), ensure_ascii=False)}")
    n_new = sum(map(len, new))
    print(f"new_tokens: {n_new}")
    print(f"tokens/s: {n_new / dt:.1f}")


if __name__ == "__main__":
    main()
